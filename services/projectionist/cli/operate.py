"""Operator commands: ``status``, ``rescale``, ``partition-index``, ``dead-letters`` and ``rebuild``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from projectionist.cli import _flags
from projectionist.cli.exit_codes import ExitCode
from projectionist.cli.run import catch_up, watch_catch_up
from projectionist.consume import dead_letters, partition_indexes
from projectionist.consume.checkpoints import Draining, group_partitions, register_group
from projectionist.consume.projection import load_projection
from projectionist.consume.rebuild import live_workers, reset
from projectionist.errors import ConfigError
from projectionist.settings import Settings
from projectionist.store.connection import connect, database_url

SubParsers = Any

_NAME_TEXT = "a projection's name, as `projectionist status` shows it"


def register(sub: SubParsers) -> None:
    p = sub.add_parser(
        "status",
        help="checkpoint, lag and last update of every partition",
        description="Where every partition of every projection is: checkpoint, lag in events and "
        "seconds, events processed, whether its owner runs.",
    )
    _flags.option(p, "--projection-name", metavar="NAME", text=f"only this projection: {_NAME_TEXT}")
    _flags.option(p, "--json", action="store_true", default=False, text="machine-readable output")

    p = sub.add_parser(
        "rescale",
        help="change a projection's partition count (no replay, no skips)",
        description="Switch a projection's group to another partition count once its workers have "
        "stopped; their checkpoints become skip marks, so nothing is replayed or skipped.",
    )
    _flags.option(p, "--projection-name", metavar="NAME", required=True, text=_NAME_TEXT)
    _flags.option(
        p,
        "--partitions",
        "--total-workers",
        dest="new_partitions",
        metavar="N",
        required=True,
        type=_flags.positive_int("--partitions"),
        text="the new partition count",
    )
    _flags.option(
        p, "--timeout", type=float, default=300.0, text="seconds to wait for the old group's workers to stop"
    )

    p = sub.add_parser(
        "partition-index",
        help="per-partition indexes, so each worker reads only its own rows",
        description="Build, drop or list the partial indexes that let the worker of partition k "
        "of N read only its own rows.",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in (
        ("create", "build the missing ones (CREATE INDEX CONCURRENTLY; idempotent)"),
        ("drop", "drop the indexes of one partition count"),
    ):
        q = actions.add_parser(action, help=text)
        _flags.option(
            q,
            "--partitions",
            "--total-workers",
            dest="index_partitions",
            metavar="N",
            required=True,
            type=_flags.positive_int("--partitions"),
            text="the partition count",
        )
        if action == "drop":
            _flags.option(
                q, "--force", action="store_true", default=False, text="even while a group uses that count"
            )
    q = actions.add_parser("list", help="the partition indexes, and the groups that use them")
    _flags.option(q, "--json", action="store_true", default=False, text="machine-readable output")

    p = sub.add_parser(
        "dead-letters",
        help="events parked by POISON_POLICY=park",
        description="List, show, retry or discard the events a worker parked after they kept failing.",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = actions.add_parser("list", help="open dead letters (--all: resolved and discarded too)")
    _flags.option(q, "--projection-name", metavar="NAME", text=f"only this projection: {_NAME_TEXT}")
    _flags.option(q, "--all", action="store_true", default=False, text="resolved and discarded letters too")
    _flags.option(q, "--json", action="store_true", default=False, text="machine-readable output")
    for action, text in (
        ("show", "one letter with its error and traceback"),
        ("retry", "re-apply the letter's aggregate, in order, in its worker"),
        ("discard", "give up on this one event for good (kept as 'discarded')"),
    ):
        actions.add_parser(action, help=text).add_argument(
            "id", type=int, help="the letter's id, from `list`"
        )

    p = sub.add_parser(
        "rebuild",
        help="reset a projection's read model and checkpoints, then catch up",
        description="Empty the read model (the projection's reset hook) and move its checkpoints "
        "back to the start, then catch up as `catch-up` does. Refused while its workers run, "
        "unless --force: they then rebuild alongside.",
    )
    _flags.setting(p, "--projection", env="PROJECTION", text="the projection to rebuild, as module:Class")
    _flags.option(
        p, "--force", action="store_true", default=False, text="even while workers of the projection run"
    )
    _flags.option(
        p, "--timeout", type=float, default=3600.0, text="give up catching up after this many seconds"
    )
    _flags.migrate_switch(p)


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from projectionist.consume.status import read_status

    with connect(database_url(settings), autocommit=True) as conn:
        status = read_status(conn, args.projection_name)
    if args.projection_name and not status.groups:
        raise ConfigError(
            f"--projection-name={args.projection_name!r}: no such projection (see `projectionist status`)"
        )
    if args.json:
        print(json.dumps(status.as_json(), indent=2))
        return ExitCode.OK
    if not status.workers:
        print("no projection has a checkpoint yet; start a worker with `projectionist worker`")
        return ExitCode.OK
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
    table.caption = "\n".join(_group_line(g, status.planner_statistics) for g in status.groups)
    # Wide enough for every column when output is piped, not a terminal.
    console = Console(width=None if sys.stdout.isatty() else 140)
    console.print(table)
    for g in status.groups:
        if g.membership is not None and g.membership.members:
            console.print(_members_table(g.membership))
    return ExitCode.OK


def _members_table(m: Any) -> Any:
    """An elastic group's members, the partitions each owns against its share, and the moves."""
    from rich.table import Table

    from projectionist.consume.membership import ranges

    table = Table(title=f"{m.projection}: {len(m.members)} elastic member(s) of {m.total_workers} partitions")
    for column in ("member", "name", "pid", "owns", "partitions", "share"):
        table.add_column(column, justify="left" if column in ("name", "partitions") else "right")
    for x in m.members:
        table.add_row(str(x.number), x.name, str(x.pid), str(len(x.owned)), ranges(x.owned), str(x.target))
    notes = []
    if m.static_owners:
        notes.append(f"held by static workers: {ranges(tuple(m.static_owners))}")
    notes.append(
        f"moves in progress: {m.moving} (unowned: {ranges(m.unowned)})" if m.moving else "no move in progress"
    )
    table.caption = "; ".join(notes)
    return table


def _group_line(g: Any, planner_statistics: bool) -> str:
    layers = "; ".join(
        f"skip marks of a retired {layer['total_workers']}-partition group up to position "
        f"{layer['highest_position']}"
        for layer in g.skip_layers
    )
    indexes = ""
    if g.total_workers > 1:
        indexes = f", partition indexes {g.indexed_partitions} of {g.total_workers}"
        if g.indexed_partitions != g.total_workers:
            indexes += f" (projectionist partition-index create --partitions {g.total_workers})"
        if g.indexed_partitions and not planner_statistics:
            indexes += (
                ", not used until the events table has planner statistics (autovacuum gathers them; "
                "or run ANALYZE events)"
            )
    return f"{g.projection}: {g.total_workers} partitions, generation {g.generation}{indexes}" + (
        f" ({layers})" if layers else ""
    )


def cmd_rescale(args: argparse.Namespace, settings: Settings) -> int:
    name, new = args.projection_name, args.new_partitions
    with connect(database_url(settings), autocommit=True) as conn:
        old = group_partitions(conn, name)
        if old is None:
            raise ConfigError(f"--projection-name={name!r}: no such projection (see `projectionist status`)")
        deadline = time.monotonic() + args.timeout
        while True:
            joined = register_group(conn, name, new, allow_rescale=True, require_stopped=True)
            if not isinstance(joined, Draining):
                break
            if time.monotonic() > deadline:
                print(
                    f"projectionist: workers {list(joined.live_workers)} of the "
                    f"{joined.old_total_workers}-partition group are still running; stop them first",
                    file=sys.stderr,
                )
                return ExitCode.ERROR
            print(
                f"waiting for workers {list(joined.live_workers)} of the "
                f"{joined.old_total_workers}-partition group to stop...",
                file=sys.stderr,
            )
            time.sleep(2.0)
    print(
        f"{name}: {old} -> {joined.total_workers} partitions "
        f"(generation {joined.generation}, {len(joined.layers)} skip-mark layer(s)); "
        f"start workers with PARTITIONS={joined.total_workers}"
    )
    return ExitCode.OK


def cmd_partition_index(args: argparse.Namespace, settings: Settings) -> int:
    def progress(line: str) -> None:
        print(line, flush=True)

    with connect(database_url(settings), autocommit=True) as conn:
        if args.action == "create":
            n = args.index_partitions
            partition_indexes.check_total_workers(n)
            print(f"building the partition indexes of {n} partitions concurrently...")
            built = partition_indexes.create_indexes(conn, n, progress)
            print(
                f"{len(built)} built, {n - len(built)} already present; "
                "running workers take them up within 30 s"
            )
            return ExitCode.OK
        if args.action == "drop":
            n = args.index_partitions
            dropped = partition_indexes.drop_indexes(conn, n, progress, force=args.force)
            print(f"{len(dropped)} dropped" if dropped else f"no indexes of {n} partitions")
            return ExitCode.OK
        sets = partition_indexes.summarize(conn)
    if args.json:
        print(json.dumps([asdict(x) for x in sets], indent=2))
        return ExitCode.OK
    if not sets:
        print("no partition indexes, and no group with more than one partition")
        return ExitCode.OK
    print(f"{'partitions':>10} {'valid':>6} {'size':>10}  used by")
    for x in sets:
        hint = (
            f"  (incomplete: projectionist partition-index create --partitions {x.total_workers})"
            if x.valid < x.total_workers and x.groups
            else ""
        )
        print(
            f"{x.total_workers:>10} {x.valid:>6} {x.size_bytes / 1048576:>8.1f}MB  "
            f"{', '.join(x.groups) or '-'}{hint}"
        )
    return ExitCode.OK


def cmd_dead_letters(args: argparse.Namespace, settings: Settings) -> int:
    with connect(database_url(settings), autocommit=True) as conn:
        if args.action == "list":
            letters = dead_letters.list_letters(conn, args.projection_name, include_closed=args.all)
            if args.json:
                print(json.dumps([_letter_json(x) for x in letters], indent=2))
            elif not letters:
                print("no open dead letters" if not args.all else "no dead letters")
            else:
                print(
                    f"{'id':>6}  {'projection':<20} {'aggregate':<24} {'ver':>5} {'position':>10} "
                    f"{'reason':<8} {'status':<9} {'tries':>5}  error"
                )
                for x in letters:
                    error = (x.error or "").splitlines()[0][:60] if x.error else ""
                    print(
                        f"{x.id:>6}  {x.projection:<20} {x.aggregate_id:<24} {x.aggregate_version:>5} "
                        f"{x.global_position:>10} {x.reason:<8} {x.status:<9} {x.attempts:>5}  {error}"
                    )
        elif args.action == "show":
            letter = dead_letters.get_letter(conn, args.id)
            if letter is None:
                raise ConfigError(f"dead letter {args.id} does not exist")
            for key, value in _letter_json(letter).items():
                if key != "traceback":
                    print(f"{key:>18}: {value}")
            event = dead_letters.event_of(conn, letter)
            if event is not None:
                print(f"{'payload':>18}: {json.dumps(event[0])}")
                print(f"{'metadata':>18}: {json.dumps(event[1])}")
            print(letter.traceback or "(no traceback: parked behind an earlier event of the aggregate)")
        elif args.action == "retry":
            queued = dead_letters.request_retry(conn, args.id)
            print(f"queued {queued} dead letter(s) for retry; the owning worker re-applies them in order")
        else:
            dead_letters.discard(conn, args.id)
            print(f"discarded dead letter {args.id}")
    return ExitCode.OK


def _letter_json(letter: dead_letters.DeadLetter) -> dict[str, Any]:
    data = asdict(letter)
    data["parked_at"] = letter.parked_at.isoformat()
    return data


def cmd_rebuild(args: argparse.Namespace, settings: Settings) -> int:
    """Reset the read model and checkpoints, then catch up with a progress bar.

    Live workers of the projection are fenced by the checkpoint compare-and-set
    (their next commit fails, they reload the reset checkpoint and continue),
    so with --force they simply rebuild alongside; without --force we refuse.
    """
    from projectionist.cli._database import prepared_database

    projection = load_projection(settings.projection)
    url = prepared_database(settings)
    with connect(url, autocommit=True) as conn:
        partitions = group_partitions(conn, projection.name) or settings.partitions
        live = live_workers(conn, projection.name, partitions)
        if live and not args.force:
            raise ConfigError(
                f"workers {live} of projection {projection.name!r} are running; stop them or pass --force"
            )
        reset(conn, projection, partitions)
    print(
        f"reset {projection.name!r}: read model emptied, {partitions} checkpoint(s) back to 0",
        file=sys.stderr,
    )
    verbs = ("rebuilding", "rebuilt")
    if live:
        return watch_catch_up(url, projection.name, args.timeout, verbs)
    return catch_up(url, settings.projection, projection, partitions, settings.worker, args.timeout, verbs)


COMMANDS: dict[str, Callable[[argparse.Namespace, Settings], int]] = {
    "status": cmd_status,
    "rescale": cmd_rescale,
    "partition-index": cmd_partition_index,
    "dead-letters": cmd_dead_letters,
    "rebuild": cmd_rebuild,
}
