"""The ``projectionist`` command: a parser, exit codes, and one module per command family."""

from __future__ import annotations

from projectionist.cli._main import main
from projectionist.cli.exit_codes import ExitCode
from projectionist.cli.parser import build_parser

__all__ = ["ExitCode", "build_parser", "main"]
