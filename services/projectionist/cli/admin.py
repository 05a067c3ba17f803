"""Operator commands beyond running workers: ``dead-letters``, ``partition-index`` and ``rebuild``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from projectionist.consume import dead_letters, partition_indexes
from projectionist.consume.ownership import LIVE_WORKERS, group_key
from projectionist.consume.projection import Projection, load_projection
from projectionist.errors import ConfigError, one_line
from projectionist.settings import Settings
from projectionist.store.connection import connect, database_url

if TYPE_CHECKING:
    from projectionist.worker.supervisor import Supervisor


def cmd_dead_letters(args: argparse.Namespace, settings: Settings) -> int:
    with connect(database_url(settings), autocommit=True) as conn:
        if args.action == "list":
            letters = dead_letters.list_letters(conn, args.projection, include_closed=args.all)
            if args.json:
                print(json.dumps([_letter_json(x) for x in letters], indent=2))
                return 0
            if not letters:
                print("no open dead letters" if not args.all else "no dead letters")
                return 0
            print(
                f"{'id':>6}  {'projection':<20} {'aggregate':<24} {'ver':>5} {'position':>10} "
                f"{'reason':<8} {'status':<9} {'tries':>5}  error"
            )
            for x in letters:
                print(
                    f"{x.id:>6}  {x.projection:<20} {x.aggregate_id:<24} {x.aggregate_version:>5} "
                    f"{x.global_position:>10} {x.reason:<8} {x.status:<9} {x.attempts:>5}  "
                    f"{(x.error or '').splitlines()[0][:60] if x.error else ''}"
                )
            return 0
        if args.action == "show":
            letter = dead_letters.get_letter(conn, args.id)
            if letter is None:
                raise ConfigError(f"dead letter {args.id} does not exist")
            for key, value in _letter_json(letter).items():
                if key != "traceback":
                    print(f"{key:>18}: {value}")
            event = conn.execute(
                "SELECT payload, metadata FROM events WHERE event_id = %s::uuid", (letter.event_id,)
            ).fetchone()
            if event is not None:
                print(f"{'payload':>18}: {json.dumps(event[0])}")
                print(f"{'metadata':>18}: {json.dumps(event[1])}")
            print(letter.traceback or "(no traceback: parked behind an earlier event of the aggregate)")
            return 0
        if args.action == "retry":
            queued = dead_letters.request_retry(conn, args.id)
            print(f"queued {queued} dead letter(s) for retry; the owning worker re-applies them in order")
            return 0
        dead_letters.discard(conn, args.id)
        print(f"discarded dead letter {args.id}")
        return 0


def cmd_partition_index(args: argparse.Namespace, settings: Settings) -> int:
    def progress(line: str) -> None:
        print(line, flush=True)

    with connect(database_url(settings), autocommit=True) as conn:
        if args.action == "create":
            partition_indexes.check_total_workers(args.total_workers)
            print(f"building the partition indexes of {args.total_workers} partitions concurrently...")
            built = partition_indexes.create_indexes(conn, args.total_workers, progress)
            print(
                f"{len(built)} built, {args.total_workers - len(built)} already present; running workers "
                "take them up within 30 s"
            )
            return 0
        if args.action == "drop":
            dropped = partition_indexes.drop_indexes(conn, args.total_workers, progress, force=args.force)
            print(f"{len(dropped)} dropped" if dropped else f"no indexes of {args.total_workers} partitions")
            return 0
        sets = partition_indexes.summarize(conn)
    if args.json:
        print(json.dumps([asdict(x) for x in sets], indent=2))
        return 0
    if not sets:
        print("no partition indexes, and no group with more than one partition")
        return 0
    print(f"{'partitions':>10} {'valid':>6} {'size':>10}  used by")
    for x in sets:
        hint = (
            f"  (incomplete: projectionist partition-index create --total-workers {x.total_workers})"
            if x.valid < x.total_workers and x.groups
            else ""
        )
        print(
            f"{x.total_workers:>10} {x.valid:>6} {x.size_bytes / 1048576:>8.1f}MB  "
            f"{', '.join(x.groups) or '-'}{hint}"
        )
    return 0


def _letter_json(letter: dead_letters.DeadLetter) -> dict[str, Any]:
    data = asdict(letter)
    data["parked_at"] = letter.parked_at.isoformat()
    return data


def _resolve_projection(spec: str | None, settings: Settings) -> Projection:
    """``--projection`` may be a class spec or the name of the configured projection."""
    if spec and ":" in spec:
        return load_projection(spec)
    configured = load_projection(settings.projection)
    if spec and spec != configured.name:
        raise ConfigError(
            f"--projection={spec!r} is not the configured projection {configured.name!r}; "
            "pass package.module:Class"
        )
    return configured


def cmd_rebuild(args: argparse.Namespace, settings: Settings) -> int:
    """Reset the read model and checkpoints, then catch up with a progress bar.

    Live workers of the projection are fenced by the checkpoint compare-and-set
    (their next commit fails, they reload the reset checkpoint and continue),
    so with --force they simply rebuild alongside; without --force we refuse.
    """
    projection = _resolve_projection(args.projection, settings)
    url = database_url(settings)
    with connect(url, autocommit=True) as conn:
        group = conn.execute(
            "SELECT total_workers FROM projection_groups WHERE projection_name = %s", (projection.name,)
        ).fetchone()
        total = int(group[0]) if group else settings.total_workers
        live = [r[0] for r in conn.execute(LIVE_WORKERS, (group_key(projection.name, total),))]
        if live and not args.force:
            raise ConfigError(
                f"workers {live} of projection {projection.name!r} are running; stop them or pass --force"
            )
        with conn.transaction():
            # The same lock workers take for setup, so a starting worker cannot
            # create the read model halfway through the reset.
            conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext('projectionist.setup'), hashtext(%s))",
                (projection.name,),
            )
            projection.setup(conn)
            reset = getattr(projection, "reset", None)
            if not callable(reset):
                raise ConfigError(f"projection {projection.name!r} has no reset(conn) hook; cannot rebuild")
            reset(conn)
            conn.execute(
                "UPDATE projection_checkpoints SET last_transaction_id = '0', last_global_position = 0, "
                "events_processed = 0, updated_at = now() WHERE projection_name = %s",
                (projection.name,),
            )
            conn.execute("DELETE FROM projection_skip_marks WHERE projection_name = %s", (projection.name,))
            # The letters describe the old read model; the replay parks again what still fails.
            conn.execute("DELETE FROM dead_letters WHERE projection_name = %s", (projection.name,))
        print(
            f"reset {projection.name!r}: read model emptied, {total} checkpoint(s) back to 0", file=sys.stderr
        )
    if live:
        return _watch(url, projection.name, args.timeout)
    return _catch_up(url, projection, total, settings, args.timeout)


def _catch_up(url: str, projection: Projection, total: int, settings: Settings, timeout: float) -> int:
    from projectionist.worker.supervisor import Supervisor

    pool = Supervisor(
        url,
        lambda: load_projection(f"{type(projection).__module__}:{type(projection).__qualname__}"),
        total,
        batch_size=settings.batch_size,
        poll_interval=0.2,
        poison_policy=dead_letters.PoisonPolicy(settings.poison_policy),
        max_retries=settings.max_retries,
    )
    pool.start()
    reported: set[str] = set()
    try:
        return _watch(url, projection.name, timeout, failure=lambda: _stopped_workers(pool, reported))
    finally:
        pool.stop()
        for worker in pool.workers:
            try:
                worker.join(timeout=30)
            except Exception as e:
                if str(worker.partition) not in reported:
                    print(
                        f"projectionist: worker {worker.partition} failed: {type(e).__name__}: {one_line(e)}",
                        file=sys.stderr,
                    )


def _stopped_workers(pool: Supervisor, reported: set[str]) -> str | None:
    """Why the rebuild's own workers stopped, if any did: nothing else would apply their partitions.

    Without this the rebuild would wait out its whole timeout (an hour by
    default) for a worker that died at once, of a setup error say.
    """
    why = []
    for worker in pool.workers:
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


def _watch(url: str, name: str, timeout: float, failure: Callable[[], str | None] = lambda: None) -> int:
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
        task = progress.add_task(f"rebuilding {name}", total=None)
        while time.monotonic() < deadline:
            why = failure()
            if why is not None:
                progress.stop()
                print(f"projectionist: rebuild of {name!r} failed: {why}", file=sys.stderr)
                return 1
            workers = read_status(conn, name).workers
            processed = sum(w.events_processed for w in workers)
            lag = sum(w.lag_events for w in workers)
            progress.update(task, completed=processed, total=processed + lag)
            if workers and lag == 0:
                print(f"rebuilt {name!r}: {processed} events applied", file=sys.stderr)
                return 0
            time.sleep(0.5)
    print(f"projectionist: rebuild of {name!r} did not catch up within {timeout:.0f}s", file=sys.stderr)
    return 1
