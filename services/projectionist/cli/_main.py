"""The ``projectionist`` command.

Subcommands: migrate, append, worker, pool, status, rescale, partition-index,
rebuild, dead-letters, api, demo, db.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

import psycopg

from projectionist import __version__
from projectionist.cli import admin
from projectionist.consume.dead_letters import PoisonPolicy
from projectionist.errors import ConfigError, ProjectionistError, first_line, one_line
from projectionist.settings import Settings, parse_positive_int, parse_worker_id

log = logging.getLogger("projectionist")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2
EXIT_INTERRUPTED = 130


def _worker_id_arg(raw: str) -> int:
    try:
        return parse_worker_id(raw, "--worker-id")
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive_int_arg(name: str) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            return parse_positive_int(raw, name)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


class _ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit code 2."""

    def error(self, message: str) -> Any:
        self.exit(EXIT_CONFIG, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(prog="projectionist", description=__doc__)
    parser.add_argument("--version", action="version", version=f"projectionist {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_ArgumentParser)

    p = sub.add_parser("migrate", help="apply pending SQL migrations (idempotent, safe in parallel)")
    p.add_argument(
        "--partition-indexes",
        type=_positive_int_arg("--partition-indexes"),
        metavar="N",
        help="then build the partition indexes of N partitions (as `partition-index create`)",
    )

    p = sub.add_parser("append", help="append sample events (the seed's --append)")
    p.add_argument("--count", type=_positive_int_arg("--count"), default=1000)
    p.add_argument("--aggregates", type=_positive_int_arg("--aggregates"), default=100)
    p.add_argument(
        "--batch-size",
        type=_positive_int_arg("--batch-size"),
        default=100,
        help="events per transaction (default 100)",
    )
    p.add_argument("--event-type", default="SampleEvent")

    def add_worker_flags(p: argparse.ArgumentParser, *, with_id: bool) -> None:
        if with_id:
            p.add_argument(
                "--worker-id",
                type=_worker_id_arg,
                help="partition to own: a number or a StatefulSet pod name (env WORKER_ID)",
            )
        p.add_argument(
            "--total-workers",
            type=_positive_int_arg("--total-workers"),
            help="number of partitions (env TOTAL_WORKERS, default 1)",
        )
        p.add_argument("--projection", help="package.module:Class (env PROJECTION, default the sample)")
        p.add_argument("--batch-size", type=_positive_int_arg("--batch-size"), help="env BATCH_SIZE")
        p.add_argument("--poll-interval", type=float, help="seconds between polls without NOTIFY")
        p.add_argument("--metrics-port", type=int, help="/metrics, /healthz, /readyz port (env METRICS_PORT)")
        p.add_argument(
            "--health-max-tick-age",
            type=float,
            help="seconds without a loop tick before /healthz fails (env HEALTH_MAX_TICK_AGE, default 60)",
        )
        p.add_argument("--no-migrate", action="store_true", help="do not apply migrations at start-up")
        p.add_argument(
            "--poison-policy",
            choices=["stop", "park"],
            help="after --max-retries failures: stop in front of the event, or park it (env POISON_POLICY)",
        )
        p.add_argument(
            "--max-retries",
            type=_positive_int_arg("--max-retries"),
            help="retries of a failing batch before the poison policy applies (env MAX_RETRIES, default 5)",
        )
        p.add_argument(
            "--rescale",
            action="store_true",
            default=None,
            help="if the projection uses another partition count, switch to this one as soon as "
            "the old group has stopped (env RESCALE=1)",
        )

    add_worker_flags(sub.add_parser("worker", help="run one partition's worker"), with_id=True)
    add_worker_flags(sub.add_parser("pool", help="run every partition in one process"), with_id=False)

    p = sub.add_parser("status", help="checkpoint, lag and last update per projection and worker")
    p.add_argument("--projection", help="only this projection (its name)")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("demo", help="replay the seed's 1 -> 4 workers scaling steps live")
    p.add_argument("--events", type=_positive_int_arg("--events"), default=20000)
    p.add_argument("--aggregates", type=_positive_int_arg("--aggregates"), default=400)
    p.add_argument("--step-seconds", type=float, default=6.0, help="seconds between adding workers")
    p.add_argument("--rate", type=float, default=1500.0, help="background appends per second (0: none)")
    p.add_argument(
        "--database",
        default="projectionist_demo",
        help="the demo's own database on the server, dropped and recreated (default projectionist_demo)",
    )
    p.add_argument(
        "--verify-only",
        action="store_true",
        help="only verify the demo database of an earlier run (exit 0 pass, 1 fail)",
    )

    p = sub.add_parser("api", help="serve the HTTP append API (uvicorn)")
    p.add_argument("--host", help="address to listen on (env API_HOST, default 0.0.0.0)")
    p.add_argument("--port", type=int, help="TCP port (env API_PORT, default 8000)")
    p.add_argument("--no-migrate", action="store_true", help="do not apply migrations at start-up")

    p = sub.add_parser("rescale", help="change a projection's partition count, safely (no replay, no skips)")
    p.add_argument("--projection", required=True, help="the projection's name, as `status` shows it")
    p.add_argument("--total-workers", type=_positive_int_arg("--total-workers"), required=True)
    p.add_argument(
        "--timeout", type=float, default=300.0, help="seconds to wait for the old group to stop (default 300)"
    )

    p = sub.add_parser(
        "partition-index", help="per-partition indexes, so each worker reads only its own rows"
    )
    pi = p.add_subparsers(dest="action", required=True, parser_class=_ArgumentParser)
    q = pi.add_parser("create", help="build the missing ones (CREATE INDEX CONCURRENTLY; idempotent)")
    q.add_argument("--total-workers", type=_positive_int_arg("--total-workers"), required=True)
    q = pi.add_parser("drop", help="drop the indexes of one partition count")
    q.add_argument("--total-workers", type=_positive_int_arg("--total-workers"), required=True)
    q.add_argument("--force", action="store_true", help="even while a worker group has that partition count")
    q = pi.add_parser("list", help="the partition indexes, and the groups that use them")
    q.add_argument("--json", action="store_true")

    p = sub.add_parser("dead-letters", help="events parked by POISON_POLICY=park")
    dl = p.add_subparsers(dest="action", required=True, parser_class=_ArgumentParser)
    q = dl.add_parser("list", help="open dead letters (use --all for resolved and discarded too)")
    q.add_argument("--projection", help="only this projection (its name)")
    q.add_argument("--all", action="store_true")
    q.add_argument("--json", action="store_true")
    for action, text in (
        ("show", "one letter with its error and traceback"),
        ("retry", "re-apply the letter's aggregate, in order, in its worker"),
        ("discard", "give up on this one event for good (kept as 'discarded')"),
    ):
        dl.add_parser(action, help=text).add_argument("id", type=int)

    p = sub.add_parser("rebuild", help="reset a projection's read model and checkpoints, then catch up")
    p.add_argument(
        "--projection", help="package.module:Class, or the name of the configured projection (env PROJECTION)"
    )
    p.add_argument("--force", action="store_true", help="even while workers of the projection are live")
    p.add_argument(
        "--timeout", type=float, default=3600.0, help="give up catching up after this many seconds"
    )

    p = sub.add_parser("db", help="the embedded PostgreSQL used when DATABASE_URL is unset")
    p.add_argument("action", choices=["start", "stop", "url"])

    # Accepted before or after the subcommand.
    for command_parser in [parser, *sub.choices.values()]:
        command_parser.add_argument(
            "--log-level",
            default=argparse.SUPPRESS,
            help="DEBUG, INFO, WARNING or ERROR (env LOG_LEVEL)",
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env(
            log_level=getattr(args, "log_level", "").upper() or None,
            **_worker_overrides(args),
        )
    except ConfigError as e:
        print(f"projectionist: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    command: Callable[[argparse.Namespace, Settings], int] = _COMMANDS[args.command]
    try:
        return command(args, settings)
    except ConfigError as e:
        print(f"projectionist: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except ProjectionistError as e:
        print(f"projectionist: {e}", file=sys.stderr)
        return EXIT_ERROR
    except psycopg.errors.InsufficientPrivilege as e:
        print(
            f"projectionist: the database role lacks a right ({first_line(e)}); see the README's "
            '"Database roles" for what each command needs',
            file=sys.stderr,
        )
        return EXIT_ERROR
    except psycopg.errors.UndefinedTable as e:
        print(
            f"projectionist: the database is not migrated ({first_line(e)}); run `projectionist migrate`",
            file=sys.stderr,
        )
        return EXIT_ERROR
    except psycopg.OperationalError as e:
        # The server is down or unreachable: a runtime failure, one line, no traceback.
        print(f"projectionist: database unavailable: {one_line(e)}", file=sys.stderr)
        return EXIT_ERROR


def _worker_overrides(args: argparse.Namespace) -> dict[str, Any]:
    names = [
        "worker_id",
        "total_workers",
        "projection",
        "batch_size",
        "poll_interval",
        "metrics_port",
        "rescale",
        "poison_policy",
        "max_retries",
    ]
    overrides = {name: getattr(args, name, None) for name in names}
    if args.command in ("status", "rescale", "rebuild", "dead-letters", "partition-index"):
        overrides["projection"] = None  # there it is a projection *name*, not a class
        if args.command in ("rescale", "rebuild", "partition-index"):
            overrides["total_workers"] = None
    return overrides


def _url(settings: Settings) -> str:
    from projectionist.store.connection import database_url

    return database_url(settings)


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from projectionist.store.connection import connect
    from projectionist.store.schema import applied_versions, migrate

    with connect(_url(settings), autocommit=True) as conn:
        applied = migrate(conn)
        versions = applied_versions(conn)
        for m in applied:
            print(f"applied {m.version:04d}_{m.name}")
        if not applied:
            print(f"database is up to date (migrations {', '.join(f'{v:04d}' for v in versions)})")
        if args.partition_indexes == 1:
            print("a single partition reads every row in order and needs no partition index")
        elif args.partition_indexes is not None:
            from projectionist.consume.partition_indexes import create_indexes

            built = create_indexes(conn, args.partition_indexes, lambda line: print(line, flush=True))
            print(f"partition indexes of {args.partition_indexes} partitions: {len(built)} built")
    return EXIT_OK


def cmd_append(args: argparse.Namespace, settings: Settings) -> int:
    from projectionist.demo.sample_events import append_sample_events
    from projectionist.store.connection import connect
    from projectionist.store.schema import migrate

    with connect(_url(settings), autocommit=True) as conn:
        migrate(conn)
        started = time.monotonic()
        last_report = started
        done = 0
        for done in append_sample_events(
            conn,
            count=args.count,
            aggregates=args.aggregates,
            batch_size=args.batch_size,
            event_type=args.event_type,
        ):
            now = time.monotonic()
            if now - last_report >= 1.0:
                print(f"  appended {done}/{args.count} events", file=sys.stderr)
                last_report = now
    elapsed = time.monotonic() - started
    print(
        f"appended {done} events to {min(args.aggregates, args.count)} aggregates "
        f"in {elapsed:.2f}s ({done / max(elapsed, 1e-9):,.0f} events/s)"
    )
    return EXIT_OK


class _GracefulStop:
    """First SIGTERM/SIGINT: stop between batches. Second: exit at once."""

    def __init__(self, stop: Callable[[], None]) -> None:
        self._stop = stop
        self.requested = False

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # The handler runs between two bytecodes of the main thread, which may
        # be inside Event.wait() holding the very lock Event.set() takes, or
        # inside a logging call writing to stderr: called here, stop() could
        # deadlock the process, and a log line raise "reentrant call". A
        # thread of its own does both instead.
        name = signal.Signals(signum).name
        if self.requested:
            os.write(2, f"projectionist: second {name}: exiting without waiting\n".encode())
            os._exit(EXIT_INTERRUPTED)
        self.requested = True
        threading.Thread(target=self._stop_for, args=(name,), name="projectionist-stop", daemon=True).start()

    def _stop_for(self, name: str) -> None:
        log.info("%s received: finishing the current batch", name)
        self._stop()


def _prepare_worker_run(args: argparse.Namespace, settings: Settings) -> tuple[str, Any]:
    from projectionist.consume.projection import load_projection
    from projectionist.store.connection import connect
    from projectionist.store.schema import migrate

    projection = load_projection(settings.projection)
    url = _url(settings)
    if not args.no_migrate:
        with connect(url, autocommit=True) as conn:
            migrate(conn)
    return url, projection


def _telemetry_options(args: argparse.Namespace, settings: Settings) -> Any:
    from projectionist.telemetry._telemetry import TelemetryOptions

    # Parsed before anything connects, so a bad value fails fast with exit code 2.
    return TelemetryOptions.from_env(settings, health_max_tick_age=args.health_max_tick_age)


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from projectionist.partitioning import Partition
    from projectionist.telemetry._telemetry import build_hooks, build_telemetry
    from projectionist.worker.gc_tuning import tune_for_throughput
    from projectionist.worker.worker import Worker

    if settings.worker_id is None:
        raise ConfigError("WORKER_ID is not set (use WORKER_ID or --worker-id)")
    options = _telemetry_options(args, settings)
    url, projection = _prepare_worker_run(args, settings)
    telemetry = build_telemetry(url, settings, [projection.name], options)
    worker = Worker(
        url,
        projection,
        Partition(settings.worker_id, settings.total_workers),
        batch_size=settings.batch_size,
        poll_interval=settings.poll_interval,
        hooks=build_hooks(settings, [projection.name], telemetry),
        connect_fn=telemetry.connect_fn,
        allow_rescale=settings.rescale,
        poison_policy=PoisonPolicy(settings.poison_policy),
        max_retries=settings.max_retries,
    )
    telemetry.register(worker.info)
    # The port is up before the loop starts, so a slow start reads as not ready, not as down.
    with telemetry:
        _GracefulStop(worker.stop).install()
        tune_for_throughput()
        worker.run()
    return EXIT_OK


def cmd_pool(args: argparse.Namespace, settings: Settings) -> int:
    from projectionist.consume.projection import load_projection
    from projectionist.telemetry._telemetry import build_hooks, build_telemetry
    from projectionist.worker.gc_tuning import tune_for_throughput
    from projectionist.worker.supervisor import Supervisor

    options = _telemetry_options(args, settings)
    url, projection = _prepare_worker_run(args, settings)
    telemetry = build_telemetry(url, settings, [projection.name], options)
    pool = Supervisor(
        url,
        # Each partition gets its own instance: projections may keep per-worker state.
        lambda: load_projection(settings.projection),
        settings.total_workers,
        batch_size=settings.batch_size,
        poll_interval=settings.poll_interval,
        hooks=build_hooks(settings, [projection.name], telemetry),
        connect_fn=telemetry.connect_fn,
        allow_rescale=settings.rescale,
        poison_policy=PoisonPolicy(settings.poison_policy),
        max_retries=settings.max_retries,
    )
    for worker in pool.workers:
        telemetry.register(worker.info)
    with telemetry:
        _GracefulStop(pool.stop).install()
        tune_for_throughput()
        pool.run()
    return EXIT_OK


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from projectionist.consume.status import read_status
    from projectionist.store.connection import connect

    with connect(_url(settings), autocommit=True) as conn:
        status = read_status(conn, args.projection)
    if args.projection and not status.groups:
        raise ConfigError(
            f"--projection={args.projection!r}: no such projection (see `projectionist status`)"
        )
    if args.json:
        print(json.dumps(status.as_json(), indent=2))
        return EXIT_OK
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"projectionist status (store head at position {status.head_position})")
    columns = (
        "projection",
        "worker",
        "live",
        "checkpoint",
        "lag (events)",
        "lag (s)",
        "processed",
        "updated",
    )
    for column in columns:
        table.add_column(column, justify="left" if column in ("projection", "live") else "right")
    for w in status.workers:
        table.add_row(
            w.projection,
            f"{w.worker_id}/{w.total_workers}",
            "yes" if w.live else "no",
            str(w.checkpoint_position),
            str(w.lag_events),
            f"{w.lag_seconds:.3f}",
            str(w.events_processed),
            w.updated_at.strftime("%Y-%m-%d %H:%M:%S"),
        )
    for g in status.groups:
        layers = "; ".join(
            f"skip marks of a retired {layer['total_workers']}-partition group up to position "
            f"{layer['highest_position']}"
            for layer in g.skip_layers
        )
        indexes = (
            ""
            if g.total_workers == 1
            else f", partition indexes {g.indexed_partitions} of {g.total_workers}"
            + (
                ""
                if g.indexed_partitions == g.total_workers
                else f" (projectionist partition-index create --total-workers {g.total_workers})"
            )
            + (
                ""
                if status.planner_statistics or not g.indexed_partitions
                else ", not used until the events table has planner statistics (autovacuum gathers them; "
                "or run ANALYZE events)"
            )
        )
        table.caption = (table.caption + "\n" if table.caption else "") + (
            f"{g.projection}: {g.total_workers} partitions, generation {g.generation}{indexes}"
            + (f" ({layers})" if layers else "")
        )
    if not status.workers:
        print("no projection has a checkpoint yet; start a worker with `projectionist worker`")
    else:
        # Wide enough for every column when output is piped, not a terminal.
        Console(width=None if sys.stdout.isatty() else 140).print(table)
    return EXIT_OK


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from projectionist.demo.run import run_demo

    return int(
        run_demo(
            settings,
            events=args.events,
            aggregates=args.aggregates,
            step_seconds=args.step_seconds,
            rate=args.rate,
            database=args.database,
            verify_only=args.verify_only,
        )
    )


def cmd_api(args: argparse.Namespace, settings: Settings) -> int:
    from projectionist.api import ApiSettings, serve
    from projectionist.store.connection import connect
    from projectionist.store.schema import migrate

    api_settings = ApiSettings.from_env(host=args.host, port=args.port)
    url = _url(settings)
    if not args.no_migrate:
        with connect(url, autocommit=True) as conn:
            migrate(conn)
    serve(url, api_settings, log_level=settings.log_level)
    return EXIT_OK


def cmd_rescale(args: argparse.Namespace, settings: Settings) -> int:
    from projectionist.consume.checkpoints import Draining, register_group
    from projectionist.store.connection import connect

    with connect(_url(settings), autocommit=True) as conn:
        exists = conn.execute(
            "SELECT total_workers FROM projection_groups WHERE projection_name = %s", (args.projection,)
        ).fetchone()
        if exists is None:
            raise ConfigError(
                f"--projection={args.projection!r}: no such projection (see `projectionist status`)"
            )
        deadline = time.monotonic() + args.timeout
        while True:
            joined = register_group(
                conn, args.projection, args.total_workers, allow_rescale=True, require_stopped=True
            )
            if not isinstance(joined, Draining):
                break
            if time.monotonic() > deadline:
                print(
                    f"projectionist: workers {list(joined.live_workers)} of the "
                    f"{joined.old_total_workers}-partition group are still running; stop them first",
                    file=sys.stderr,
                )
                return EXIT_ERROR
            print(
                f"waiting for workers {list(joined.live_workers)} of the "
                f"{joined.old_total_workers}-partition group to stop...",
                file=sys.stderr,
            )
            time.sleep(2.0)
    print(
        f"{args.projection}: {exists[0]} -> {joined.total_workers} partitions "
        f"(generation {joined.generation}, {len(joined.layers)} skip-mark layer(s)); "
        f"start workers with TOTAL_WORKERS={joined.total_workers}"
    )
    return EXIT_OK


def cmd_db(args: argparse.Namespace, settings: Settings) -> int:
    from projectionist.store.connection import embedded_server

    if settings.database_url:
        print("DATABASE_URL is set; the embedded server is not used", file=sys.stderr)
        return EXIT_CONFIG
    server = embedded_server(settings.data_dir)
    if args.action == "start":
        server.start()
        print(server.url)
    elif args.action == "stop":
        # Stopping what is not running is not an error (the wanted state
        # holds), but saying "stopped" would hide a wrong DATA_DIR.
        if server.stop():
            print("embedded PostgreSQL stopped")
        else:
            print(f"embedded PostgreSQL was not running (data directory {server.data_dir})")
    else:
        if not server.is_running():
            print("embedded PostgreSQL is not running; `projectionist db start`", file=sys.stderr)
            return EXIT_ERROR
        print(server.url)
    return EXIT_OK


_COMMANDS: dict[str, Callable[[argparse.Namespace, Settings], int]] = {
    "migrate": cmd_migrate,
    "append": cmd_append,
    "worker": cmd_worker,
    "pool": cmd_pool,
    "status": cmd_status,
    "demo": cmd_demo,
    "rescale": cmd_rescale,
    "dead-letters": admin.cmd_dead_letters,
    "partition-index": admin.cmd_partition_index,
    "rebuild": admin.cmd_rebuild,
    "db": cmd_db,
    "api": cmd_api,
}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
