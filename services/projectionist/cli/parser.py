"""The ``projectionist`` command line: one parser, each command family registering its own."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from projectionist._version import __version__
from projectionist.cli import _flags, api, demo, operate, run, store
from projectionist.settings import Settings

DESCRIPTION = (
    "Gap-safe, partitioned projection workers for an event store on PostgreSQL. "
    "Every setting can come from the environment; a flag overrides its variable."
)

#: The command families, in the order the help lists them.
FAMILIES = (run, store, operate, api, demo)

Command = Callable[[argparse.Namespace, Settings], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="projectionist", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"projectionist {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")
    for family in FAMILIES:
        family.register(sub)
    # Accepted before or after the command.
    for command_parser in [parser, *sub.choices.values()]:
        _flags.setting(
            command_parser,
            "--log-level",
            env="LOG_LEVEL",
            text="DEBUG, INFO, WARNING or ERROR",
            default=argparse.SUPPRESS,
        )
    return parser


def commands() -> dict[str, Command]:
    """Every command's handler, by name."""
    found: dict[str, Command] = {}
    for family in FAMILIES:
        found.update(family.COMMANDS)
    return found
