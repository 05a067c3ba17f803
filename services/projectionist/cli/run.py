"""Commands that run workers: ``worker`` (one partition), ``pool`` (all of them), ``catch-up``."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from types import FrameType
from typing import Any

from projectionist.cli import _flags
from projectionist.cli._database import prepared_database
from projectionist.cli.exit_codes import ExitCode
from projectionist.consume.checkpoints import group_partitions
from projectionist.consume.projection import Projection, load_projection
from projectionist.errors import ConfigError, one_line
from projectionist.partitioning import Partition
from projectionist.settings import (
    DEFAULT_ELASTIC_PARTITIONS,
    PoisonPolicy,
    Settings,
    WorkerMode,
    WorkerOptions,
)
from projectionist.store.connection import connect
from projectionist.store.schema import require_migrated

log = logging.getLogger("projectionist")

SubParsers = Any  # argparse's _SubParsersAction, which typeshed does not make generic here


def register(sub: SubParsers) -> None:
    p = sub.add_parser(
        "worker",
        help="run one partition of a projection, or a fair share of them (--elastic)",
        description="Run the worker of one partition until SIGTERM or Ctrl-C; a second process for "
        "the same partition waits as a hot standby. With --elastic, join the projection's group "
        "instead and process a fair share of its partitions, which move as workers join and leave.",
    )
    _flags.setting(
        p,
        "--worker-id",
        env="WORKER_ID",
        text="the partition this worker owns: a number, or a StatefulSet pod name like projection-worker-3",
    )
    _flags.setting_const(
        p,
        "--elastic",
        env="WORKER_MODE",
        value=WorkerMode.ELASTIC,
        text="no WORKER_ID: join the group and take a fair share of its partitions",
    )
    _flags.setting(
        p,
        "--rebalance-interval",
        env="REBALANCE_INTERVAL",
        text="elastic: seconds between looks at the group's members",
    )
    _worker_flags(
        p,
        partitions_text="partition count of the projection's group; elastic: only of a group not yet "
        f"created, {DEFAULT_ELASTIC_PARTITIONS} unless set",
    )
    _telemetry_flags(p)

    p = sub.add_parser(
        "pool",
        help="run every partition of a projection in one process",
        description="Run every partition of a projection, one thread each, in this one process.",
    )
    _worker_flags(p)
    _telemetry_flags(p)

    p = sub.add_parser(
        "catch-up",
        help="apply every event appended so far, then exit",
        description="Run every partition of a projection until every event appended so far is "
        "applied, then exit: a backfill, or a cron job. Exits 1 if a worker fails.",
    )
    _worker_flags(p)
    _flags.option(p, "--timeout", text="give up after this many seconds", default=3600.0, type=float)


def _worker_flags(
    p: argparse.ArgumentParser, partitions_text: str = "partition count of the projection's group"
) -> None:
    _flags.setting(
        p,
        "--partitions",
        "--total-workers",
        env="PARTITIONS",
        text=partitions_text,
        metavar="N",
    )
    _flags.setting(p, "--projection", env="PROJECTION", text="the projection to run, as module:Class")
    _flags.setting(p, "--batch-size", env="BATCH_SIZE", text="most events applied in one transaction")
    _flags.setting(p, "--poll-interval", env="POLL_INTERVAL", text="seconds between reads without a wake-up")
    _flags.setting(
        p,
        "--poison-policy",
        env="POISON_POLICY",
        text="after --max-retries failures: stop in front of the event, or park it as a dead letter",
        choices=list(PoisonPolicy),
    )
    _flags.setting(
        p, "--max-retries", env="MAX_RETRIES", text="retries of a failing batch before the poison policy"
    )
    _flags.setting_switch(
        p,
        "--rescale",
        env="RESCALE",
        text="if the group has another partition count, switch to this one once the old group has stopped",
    )
    _flags.migrate_switch(p)


def _telemetry_flags(p: argparse.ArgumentParser) -> None:
    _flags.setting(p, "--metrics-port", env="METRICS_PORT", text="serve /metrics, /healthz and /readyz here")
    _flags.setting(
        p,
        "--health-max-tick-age",
        env="HEALTH_MAX_TICK_AGE",
        text="seconds without a loop tick before /healthz fails",
    )


class GracefulStop:
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
            os._exit(ExitCode.INTERRUPTED)
        self.requested = True
        threading.Thread(target=self._stop_for, args=(name,), name="projectionist-stop", daemon=True).start()

    def _stop_for(self, name: str) -> None:
        log.info("%s received: finishing the current batch", name)
        self._stop()


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from projectionist.telemetry import Telemetry
    from projectionist.worker import Worker
    from projectionist.worker.gc_tuning import tune_for_throughput

    if settings.worker_mode is WorkerMode.ELASTIC:
        return cmd_elastic_worker(settings)
    if settings.worker_id is None:
        raise ConfigError(
            "WORKER_ID is not set (use WORKER_ID or --worker-id; or WORKER_MODE=elastic or --elastic "
            "for a worker that takes its partitions itself)"
        )
    projection = load_projection(settings.projection)
    url = prepared_database(settings)
    telemetry = Telemetry(url, [projection.name], settings.telemetry)
    worker = Worker(
        url,
        projection,
        Partition(settings.worker_id, settings.partitions),
        settings.worker,
        hooks=telemetry.hook_chain(),
        connect_fn=telemetry.connect_fn,
    )
    telemetry.register(worker.info)
    # The port is up before the loop starts, so a slow start reads as not ready, not as down.
    with telemetry:
        GracefulStop(worker.stop).install()
        tune_for_throughput()
        worker.run()
    return ExitCode.OK


def cmd_elastic_worker(settings: Settings) -> int:
    """``worker --elastic``: a member of the projection's group, with its fair share of the partitions."""
    from projectionist.telemetry import Telemetry
    from projectionist.worker.elastic import ElasticWorker
    from projectionist.worker.gc_tuning import tune_for_throughput

    projection = load_projection(settings.projection)
    url = prepared_database(settings)
    telemetry = Telemetry(url, [projection.name], settings.telemetry)
    worker = ElasticWorker(
        url,
        lambda: load_projection(settings.projection),
        settings.worker,
        partitions=settings.partitions,
        hooks=telemetry.hook_chain(),
        connect_fn=telemetry.connect_fn,
    )
    with telemetry:
        GracefulStop(worker.stop).install()
        tune_for_throughput()
        worker.run()
    return ExitCode.OK


def cmd_pool(args: argparse.Namespace, settings: Settings) -> int:
    from projectionist.telemetry import Telemetry
    from projectionist.worker import Supervisor
    from projectionist.worker.gc_tuning import tune_for_throughput

    projection = load_projection(settings.projection)
    url = prepared_database(settings)
    telemetry = Telemetry(url, [projection.name], settings.telemetry)
    supervisor = Supervisor(
        url,
        lambda: load_projection(settings.projection),
        settings.partitions,
        settings.worker,
        hooks=telemetry.hook_chain(),
        connect_fn=telemetry.connect_fn,
    )
    for worker in supervisor.workers:
        telemetry.register(worker.info)
    with telemetry:
        GracefulStop(supervisor.stop).install()
        tune_for_throughput()
        supervisor.run()
    return ExitCode.OK


def cmd_catch_up(args: argparse.Namespace, settings: Settings) -> int:
    projection = load_projection(settings.projection)
    url = prepared_database(settings)
    with connect(url, autocommit=True) as conn:
        require_migrated(conn)
        partitions = group_partitions(conn, projection.name) or settings.partitions
    return catch_up(url, settings.projection, projection, partitions, settings.worker, args.timeout)


def catch_up(
    url: str,
    spec: str,
    projection: Projection,
    partitions: int,
    options: WorkerOptions,
    timeout: float,
    verbs: tuple[str, str] = ("catching up", "caught up"),
) -> int:
    """Run every partition in this process until the projection has no lag; exit code."""
    from projectionist.worker import Supervisor

    # Each partition gets an instance of its own, as in `pool`. A short poll:
    # the last events are found sooner, and this process does not stay long.
    supervisor = Supervisor(
        url, lambda: load_projection(spec), partitions, replace(options, poll_interval=0.2)
    )
    supervisor.start()
    reported: set[str] = set()
    try:
        return watch_catch_up(
            url, projection.name, timeout, verbs, failure=lambda: _stopped_workers(supervisor, reported)
        )
    finally:
        supervisor.stop()
        for worker in supervisor.workers:
            try:
                worker.join(timeout=30)
            except Exception as e:
                if str(worker.partition) not in reported:
                    print(
                        f"projectionist: worker {worker.partition} failed: {type(e).__name__}: {one_line(e)}",
                        file=sys.stderr,
                    )


def _stopped_workers(supervisor: Any, reported: set[str]) -> str | None:
    """Why this process's own workers stopped, if any did: nothing else would apply their partitions.

    Without this, catching up would wait out its whole timeout for a worker
    that died at once, of a setup error say.
    """
    why = []
    for worker in supervisor.workers:
        if worker.is_alive():
            continue
        reported.add(str(worker.partition))
        try:
            worker.join(timeout=0)
        except Exception as e:
            why.append(f"worker {worker.partition} stopped: {type(e).__name__}: {one_line(e)}")
        else:
            why.append(f"worker {worker.partition} stopped")
    return "; ".join(why) or None


def watch_catch_up(
    url: str,
    name: str,
    timeout: float,
    verbs: tuple[str, str] = ("catching up", "caught up"),
    failure: Callable[[], str | None] = lambda: None,
) -> int:
    """A progress bar until projection ``name`` has no lag; exit code (1: a failure, or the timeout).

    ``verbs`` name the work while it runs and once it is done.
    """
    doing, done = verbs
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from projectionist.consume.status import read_status

    deadline = time.monotonic() + timeout
    with (
        connect(url, autocommit=True) as conn,
        Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            transient=not sys.stderr.isatty(),
        ) as progress,
    ):
        task = progress.add_task(f"{doing} {name}", total=None)
        while time.monotonic() < deadline:
            why = failure()
            if why is not None:
                progress.stop()
                print(f"projectionist: {doing} {name!r} failed: {why}", file=sys.stderr)
                return ExitCode.ERROR
            workers = read_status(conn, name).workers
            processed = sum(w.events_processed for w in workers)
            lag = sum(w.lag_events for w in workers)
            progress.update(task, completed=processed, total=processed + lag)
            if workers and lag == 0:
                print(f"{done} {name!r}: {processed} events applied", file=sys.stderr)
                return ExitCode.OK
            time.sleep(0.5)
    print(f"projectionist: {name!r} did not catch up within {timeout:.0f}s", file=sys.stderr)
    return ExitCode.ERROR


COMMANDS: dict[str, Callable[[argparse.Namespace, Settings], int]] = {
    "worker": cmd_worker,
    "pool": cmd_pool,
    "catch-up": cmd_catch_up,
}
