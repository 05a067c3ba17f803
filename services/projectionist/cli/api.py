"""``projectionist api``: the HTTP append API."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from projectionist.cli import _flags
from projectionist.cli._database import prepared_database
from projectionist.cli.exit_codes import ExitCode
from projectionist.settings import Settings

SubParsers = Any


def register(sub: SubParsers) -> None:
    p = sub.add_parser(
        "api",
        help="serve the HTTP append API",
        description="Serve POST /streams/{aggregate_id}/events and friends with uvicorn, until "
        "SIGTERM or Ctrl-C; in-flight requests finish first. The API_* variables configure it.",
    )
    _flags.setting(p, "--host", env="API_HOST", text="address to listen on")
    _flags.setting(p, "--port", env="API_PORT", text="TCP port")
    _flags.migrate_switch(p)


def cmd_api(args: argparse.Namespace, settings: Settings) -> int:
    from projectionist.api import serve

    url = prepared_database(settings)
    serve(url, settings.api, log_level=settings.log_level, tracing=settings.telemetry.tracing)
    return ExitCode.OK


COMMANDS: dict[str, Callable[[argparse.Namespace, Settings], int]] = {"api": cmd_api}
