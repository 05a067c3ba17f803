"""``projectionist demo``: the upstream example's 1 -> 4 workers story, live."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from projectionist.cli import _flags
from projectionist.cli.exit_codes import ExitCode
from projectionist.settings import Settings

SubParsers = Any


def register(sub: SubParsers) -> None:
    from projectionist.demo.run import DEMO_DATABASE

    p = sub.add_parser(
        "demo",
        help="scale a projection from 1 to 4 workers live, then verify every event was applied once",
        description="Replay the upstream example's scaling from 1 to 4 workers on a database of "
        "its own, live, under append load; then verify the read model event by event.",
    )
    _flags.option(
        p, "--events", type=_flags.positive_int("--events"), default=20000, text="events appended first"
    )
    _flags.option(
        p, "--aggregates", type=_flags.positive_int("--aggregates"), default=400, text="aggregates they go to"
    )
    _flags.option(p, "--step-seconds", type=float, default=6.0, text="seconds between adding workers")
    _flags.option(p, "--rate", type=float, default=1500.0, text="background appends per second, 0 for none")
    _flags.option(
        p,
        "--database",
        default=DEMO_DATABASE,
        text="the demo's own database on the server, dropped and created anew",
    )
    _flags.option(
        p,
        "--elastic",
        action="store_true",
        default=False,
        text="the same story with elastic workers: no worker ids, 8 partitions moving as workers "
        "join and, at the end, one leaves",
    )
    _flags.option(
        p,
        "--verify-only",
        action="store_true",
        default=False,
        text="only verify the demo database of an earlier run (exit 0 pass, 1 fail)",
    )


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from projectionist.demo.run import DemoOutcome, run_demo

    outcome = run_demo(
        settings,
        events=args.events,
        aggregates=args.aggregates,
        step_seconds=args.step_seconds,
        rate=args.rate,
        database=args.database,
        verify_only=args.verify_only,
        elastic=args.elastic,
    )
    return {
        DemoOutcome.PASSED: ExitCode.OK,
        DemoOutcome.FAILED: ExitCode.ERROR,
        DemoOutcome.INTERRUPTED: ExitCode.INTERRUPTED,
    }[outcome]


COMMANDS: dict[str, Callable[[argparse.Namespace, Settings], int]] = {"demo": cmd_demo}
