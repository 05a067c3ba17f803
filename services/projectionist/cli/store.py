"""Commands on the event store itself: ``migrate``, ``append`` and the embedded server (``db``)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from projectionist.cli import _flags
from projectionist.cli._database import prepared_database
from projectionist.cli.exit_codes import ExitCode
from projectionist.errors import ConcurrencyError, ConfigError
from projectionist.records import ANY, NO_STREAM, ExpectedVersion, NewEvent
from projectionist.settings import Settings
from projectionist.store.appending import StreamAppend, append_many, validate_aggregate_id
from projectionist.store.connection import connect, database_url, embedded_server
from projectionist.store.schema import applied_versions, migrate

SubParsers = Any


def register(sub: SubParsers) -> None:
    p = sub.add_parser(
        "migrate",
        help="apply pending SQL migrations (idempotent, safe to run in parallel)",
        description="Apply the pending migrations of the store's schema, under an advisory lock. "
        "Run it before starting workers, the API or a new version of either.",
    )
    _flags.option(
        p,
        "--partitions",
        "--partition-indexes",
        dest="index_partitions",
        metavar="N",
        type=_flags.positive_int("--partitions"),
        text="then build the partition indexes of N partitions, as `partition-index create`",
    )

    p = sub.add_parser(
        "append",
        help="append events: from a JSON Lines file, or generated samples",
        description="Append events from a JSON Lines file, one event per line: "
        '{"aggregate_id": "order-1", "type": "ItemAdded", "data": {...}} with optional '
        '"metadata" and "expected_version" (a number, "any" or "no_stream"). Every line is '
        "checked before anything is written, and the file is appended in one transaction. "
        "Without --from, generated sample events are appended instead.",
    )
    _flags.option(
        p,
        "--from",
        dest="source",
        metavar="FILE",
        text="a JSON Lines file of events, or - for standard input",
    )
    _flags.option(
        p, "--count", type=_flags.positive_int("--count"), default=1000, text="sample events to append"
    )
    _flags.option(
        p,
        "--aggregates",
        metavar="N",
        type=_flags.positive_int("--aggregates"),
        default=100,
        text="aggregates the sample events go to, round robin",
    )
    _flags.option(
        p,
        "--batch-size",
        dest="append_batch_size",
        metavar="N",
        type=_flags.positive_int("--batch-size"),
        default=100,
        text="sample events per transaction",
    )
    _flags.option(p, "--event-type", default="SampleEvent", text="event type of the sample events")

    p = sub.add_parser(
        "db",
        help="the embedded PostgreSQL used when DATABASE_URL is unset",
        description="Start, stop or locate the embedded PostgreSQL that commands use when "
        "DATABASE_URL is unset (its data lives in PROJECTIONIST_DATA_DIR, default .projectionist).",
    )
    db = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    db.add_parser("start", help="start it (or find it running) and print its URL")
    db.add_parser("stop", help="stop it")
    db.add_parser("url", help="print its URL, if it is running")


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    with connect(database_url(settings), autocommit=True) as conn:
        applied = migrate(conn)
        for m in applied:
            print(f"applied {m.version:04d}_{m.name}")
        if not applied:
            versions = ", ".join(f"{v:04d}" for v in applied_versions(conn))
            print(f"database is up to date (migrations {versions})")
        if args.index_partitions == 1:
            print("a single partition reads every row in order and needs no partition index")
        elif args.index_partitions is not None:
            from projectionist.consume.partition_indexes import create_indexes

            built = create_indexes(conn, args.index_partitions, lambda line: print(line, flush=True))
            print(f"partition indexes of {args.index_partitions} partitions: {len(built)} built")
    return ExitCode.OK


@dataclass(frozen=True, slots=True)
class _Line:
    number: int
    aggregate_id: str
    event: NewEvent
    expected_version: ExpectedVersion | None


def cmd_append(args: argparse.Namespace, settings: Settings) -> int:
    if args.source is not None:
        return _append_file(args.source, settings)
    from projectionist.demo.sample_events import append_sample_events

    with connect(prepared_database(settings), autocommit=True) as conn:
        started = time.monotonic()
        done = _with_progress(
            append_sample_events(
                conn,
                count=args.count,
                aggregates=args.aggregates,
                batch_size=args.append_batch_size,
                event_type=args.event_type,
            ),
            args.count,
        )
    elapsed = time.monotonic() - started
    print(
        f"appended {done} events to {min(args.aggregates, args.count)} aggregates "
        f"in {elapsed:.2f}s ({done / max(elapsed, 1e-9):,.0f} events/s)"
    )
    return ExitCode.OK


def _with_progress(appended: Iterator[int], total: int) -> int:
    """Drain ``appended`` (running totals), printing progress once a second; the last total."""
    done = 0
    last_report = time.monotonic()
    for done in appended:
        now = time.monotonic()
        if now - last_report >= 1.0:
            print(f"  appended {done}/{total} events", file=sys.stderr)
            last_report = now
    return done


def _append_file(source: str, settings: Settings) -> int:
    if source == "-":
        lines = _read_lines(sys.stdin, "<stdin>")
    else:
        path = Path(source)
        try:
            with path.open(encoding="utf-8") as f:
                lines = _read_lines(f, source)
        except OSError as e:
            raise ConfigError(f"--from {source}: cannot read it ({e.strerror})") from None
    if not lines:
        print(f"{source}: no events to append")
        return ExitCode.OK
    runs = list(_runs(lines))
    with connect(prepared_database(settings), autocommit=True) as conn:
        started = time.monotonic()
        # One transaction: the whole file or nothing, whatever fails half-way.
        with conn.transaction():
            done = _with_progress(_append_runs(conn, runs, source), len(lines))
    streams = len({line.aggregate_id for line in lines})
    print(f"appended {done} events to {streams} streams from {source} in {time.monotonic() - started:.2f}s")
    return ExitCode.OK


def _append_runs(conn: Any, runs: list[list[_Line]], source: str) -> Iterator[int]:
    done = 0
    for run in runs:
        first = run[0]
        expected = ANY if first.expected_version is None else first.expected_version
        try:
            append_many(conn, [StreamAppend(first.aggregate_id, [line.event for line in run], expected)])
        except ConcurrencyError as e:
            raise ConcurrencyError(
                e.aggregate_id, e.expected, e.actual, f"{source}:{first.number}; nothing was appended"
            ) from e
        done += len(run)
        yield done


def _runs(lines: list[_Line]) -> Iterator[list[_Line]]:
    """Runs of consecutive lines of one stream, each appended at once.

    A line with an expected version starts a run of its own: the version is
    the stream's before that line's event.
    """
    run: list[_Line] = []
    for line in lines:
        if run and (line.aggregate_id != run[0].aggregate_id or line.expected_version is not None):
            yield run
            run = []
        run.append(line)
    if run:
        yield run


_EXPECTED: dict[str, ExpectedVersion] = {"any": ANY, "no_stream": NO_STREAM}


def _read_lines(f: TextIO, source: str) -> list[_Line]:
    """Every event of ``f``; a bad line is a :class:`ConfigError` naming it, and nothing is appended."""
    lines = []
    for number, raw in enumerate(f, start=1):
        if not raw.strip():
            continue
        where = f"{source}:{number}"

        def bad(problem: str, where: str = where) -> ConfigError:
            return ConfigError(f"{where}: {problem}; nothing was appended")

        try:
            item = json.loads(raw)
        except ValueError as e:
            raise bad(f"not JSON ({e})") from None
        if not isinstance(item, dict):
            raise bad("not a JSON object")
        unknown = set(item) - {"aggregate_id", "type", "data", "metadata", "expected_version"}
        if unknown:
            raise bad(f"unknown keys {sorted(unknown)}")
        aggregate_id, event_type = item.get("aggregate_id"), item.get("type")
        data, metadata = item.get("data", {}), item.get("metadata", {})
        if not isinstance(aggregate_id, str):
            raise bad('"aggregate_id" must be a string')
        try:
            validate_aggregate_id(aggregate_id)
        except ValueError as e:
            raise bad(str(e)) from None
        if not isinstance(event_type, str) or not event_type:
            raise bad('"type" must be a non-empty string')
        if not isinstance(data, dict) or not isinstance(metadata, dict):
            raise bad('"data" and "metadata" must be JSON objects')
        expected = _expected_version(item.get("expected_version"), bad)
        lines.append(_Line(number, aggregate_id, NewEvent(event_type, data, metadata), expected))
    return lines


def _expected_version(raw: object, bad: Callable[[str], ConfigError]) -> ExpectedVersion | None:
    if raw is None:
        return None
    if isinstance(raw, str) and raw in _EXPECTED:
        return _EXPECTED[raw]
    if isinstance(raw, int) and not isinstance(raw, bool) and raw >= 0:
        return raw
    raise bad('"expected_version" must be a version number, "any" or "no_stream"')


def cmd_db(args: argparse.Namespace, settings: Settings) -> int:
    if settings.database_url:
        print("DATABASE_URL is set; the embedded server is not used", file=sys.stderr)
        return ExitCode.CONFIG
    server = embedded_server(settings.data_dir)
    if args.action == "start":
        server.start()
        print(server.url)
    elif args.action == "stop":
        # Stopping what is not running is not an error (the wanted state
        # holds), but saying "stopped" would hide a wrong data directory.
        if server.stop():
            print("embedded PostgreSQL stopped")
        else:
            print(f"embedded PostgreSQL was not running (data directory {server.data_dir})")
    elif not server.is_running():
        print("embedded PostgreSQL is not running; `projectionist db start`", file=sys.stderr)
        return ExitCode.ERROR
    else:
        print(server.url)
    return ExitCode.OK


COMMANDS: dict[str, Callable[[argparse.Namespace, Settings], int]] = {
    "migrate": cmd_migrate,
    "append": cmd_append,
    "db": cmd_db,
}
