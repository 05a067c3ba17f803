"""The CLI reference page, generated from the parser: ``python -m projectionist.cli.reference``.

``make docs`` writes it to ``docs/reference/cli.md``; a test fails when the
committed page differs from what the parser says now.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator

from projectionist.cli.parser import build_parser

#: Columns the help is wrapped at, whatever the terminal: the page must not depend on it.
WIDTH = 100

_HEADER = """\
# CLI reference

Every command of `projectionist`, as its `--help` prints it. Every setting
can also come from its environment variable (see the
[configuration reference](configuration.md)); a flag overrides its variable.
This page is generated from the parser (`make docs`).
"""


def _commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*path, name))


def render() -> str:
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(WIDTH)  # argparse wraps at the terminal's width
    try:
        sections = [_HEADER]
        for path, parser in _commands(build_parser()):
            title = " ".join(("projectionist", *path))
            sections.append(f"## `{title}`\n\n```text\n{parser.format_help().rstrip()}\n```\n")
        return "\n".join(sections)
    finally:
        if previous is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = previous


if __name__ == "__main__":
    sys.stdout.write(render())
