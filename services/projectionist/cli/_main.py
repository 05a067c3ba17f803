"""``projectionist``'s entry point: parse, configure, run the command, turn failures into one line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import psycopg

from projectionist.cli.exit_codes import ExitCode
from projectionist.cli.parser import build_parser, commands
from projectionist.errors import ConfigError, ProjectionistError, first_line, one_line
from projectionist.settings import VARIABLES, Settings


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env(**_flags_given(args))
    except ConfigError as e:
        print(f"projectionist: error: {e}", file=sys.stderr)
        return ExitCode.CONFIG
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return commands()[args.command](args, settings)
    except ConfigError as e:
        print(f"projectionist: error: {e}", file=sys.stderr)
        return ExitCode.CONFIG
    except ProjectionistError as e:
        print(f"projectionist: {e}", file=sys.stderr)
        return ExitCode.ERROR
    except psycopg.errors.InsufficientPrivilege as e:
        print(
            f"projectionist: the database role lacks a right ({first_line(e)}); see the docs' "
            '"Database roles" for what each command needs',
            file=sys.stderr,
        )
        return ExitCode.ERROR
    except psycopg.errors.UndefinedTable as e:
        print(
            f"projectionist: the database is not migrated ({first_line(e)}); run `projectionist migrate`",
            file=sys.stderr,
        )
        return ExitCode.ERROR
    except psycopg.OperationalError as e:
        # The server is down or unreachable: a runtime failure, one line, no traceback.
        print(f"projectionist: database unavailable: {one_line(e)}", file=sys.stderr)
        return ExitCode.ERROR


_SETTING_FLAGS = frozenset(v.flag for v in VARIABLES)


def _flags_given(args: argparse.Namespace) -> dict[str, object]:
    """The flags that override a setting; each command's parser gives them the settings' names."""
    return {name: value for name, value in vars(args).items() if name in _SETTING_FLAGS and value is not None}
