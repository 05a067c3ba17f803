"""Checkpoints, worker groups and rescaling: where each worker is, and the partition count it uses."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg import sql

from projectionist.consume.ownership import LIVE_WORKERS, group_key
from projectionist.consume.reader import RetiredGroupMarks
from projectionist.errors import ConfigError, FencedError
from projectionist.partitioning import Partition
from projectionist.records import Position
from projectionist.store.connection import Connection

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GroupConfig:
    """A projection's worker group: partition count, generation, and skip marks still in force."""

    projection: str
    total_workers: int
    generation: int
    layers: tuple[RetiredGroupMarks, ...]


@dataclass(frozen=True, slots=True)
class Draining:
    """A rescale is wanted but workers of the old group are still running."""

    old_total_workers: int
    live_workers: tuple[int, ...]


def register_group(
    conn: Connection,
    projection: str,
    total_workers: int,
    *,
    allow_rescale: bool = False,
    require_stopped: bool = False,
) -> GroupConfig | Draining:
    """Join the projection's group with ``total_workers`` partitions.

    A different count than the group's is handled safely, never silently:
    - nothing processed yet under the old count: switch at once (with
      ``require_stopped``, as ``projectionist rescale`` asks, once no old-group
      worker runs);
    - otherwise, without ``allow_rescale``: refuse with :class:`ConfigError`;
    - with ``allow_rescale``: return :class:`Draining` while any old-group
      worker still runs, then switch with skip marks (see :func:`_switch`).
    """
    with conn.transaction():
        # FOR UPDATE serialises everyone who joins or switches this group, so
        # two processes can never both switch it, and an old-group worker that
        # starts mid-switch sees the new count when it gets the row.
        conn.execute(
            "INSERT INTO projection_groups (projection_name, total_workers) VALUES (%s, %s) "
            "ON CONFLICT (projection_name) DO NOTHING",
            (projection, total_workers),
        )
        row = conn.execute(
            "SELECT total_workers, generation FROM projection_groups WHERE projection_name = %s FOR UPDATE",
            (projection,),
        ).fetchone()
        assert row is not None
        current, generation = int(row[0]), int(row[1])
        if current != total_workers:
            moved = conn.execute(
                "SELECT count(*) FROM projection_checkpoints "
                "WHERE projection_name = %s AND total_workers = %s AND last_global_position > 0",
                (projection, current),
            ).fetchone()
            processed = bool(moved and moved[0])
            if processed and not allow_rescale:
                raise ConfigError(
                    f"the partition count {total_workers} (PARTITIONS or TOTAL_WORKERS) differs from the "
                    f"{current} partitions projection {projection!r} uses; to change it, stop the old "
                    f"workers and run `projectionist rescale --projection-name {projection} --partitions "
                    f"{total_workers}`, or start the new workers with --rescale"
                )
            # Once the old group processed anything its checkpoints become
            # marks, so they must be final. `rescale` waits even before that: a
            # worker between joining and its first batch would otherwise keep
            # its partition next to the new group's.
            if processed or require_stopped:
                live = tuple(r[0] for r in conn.execute(LIVE_WORKERS, (group_key(projection, current),)))
                if live:
                    return Draining(current, live)
            generation = _switch(conn, projection, current, generation, total_workers)
        layers = load_layers(conn, projection)
    return GroupConfig(projection, total_workers, generation, layers)


def _switch(conn: Connection, projection: str, old_total: int, generation: int, new_total: int) -> int:
    """Replace the old group by a new one, carrying the old checkpoints as skip marks.

    Runs inside register_group's transaction with the group row locked and no
    old-group worker alive, so the old checkpoints are final.
    """
    old = {
        int(r[0]): Position(int(r[1]), int(r[2]))
        for r in conn.execute(
            "SELECT worker_id, last_transaction_id::text, last_global_position "
            "FROM projection_checkpoints WHERE projection_name = %s AND total_workers = %s",
            (projection, old_total),
        )
    }
    # A partition that never had a worker applied nothing: its mark is the start.
    new_layer = RetiredGroupMarks(old_total, tuple(old.get(k, Position()) for k in range(old_total)))
    layers = [*load_layers(conn, projection), new_layer]
    # Every event at or below a layer's lowest mark was applied (by that layer's
    # group or, through its own marks, an earlier one), so start at the highest
    # such point, and forget layers the new group starts beyond.
    start = max((layer.lowest for layer in layers), default=Position())
    layers = [layer for layer in layers if layer.highest > start]
    conn.execute("DELETE FROM projection_skip_marks WHERE projection_name = %s", (projection,))
    for index, layer in enumerate(layers):
        for worker_id, mark in enumerate(layer.marks):
            conn.execute(
                "INSERT INTO projection_skip_marks (projection_name, generation, total_workers, "
                "worker_id, last_transaction_id, last_global_position) "
                "VALUES (%s, %s, %s, %s, %s::text::xid8, %s)",
                (
                    projection,
                    index + 1,
                    layer.total_workers,
                    worker_id,
                    str(mark.transaction_id),
                    mark.global_position,
                ),
            )
    conn.execute(
        "DELETE FROM projection_checkpoints WHERE projection_name = %s AND total_workers = %s",
        (projection, old_total),
    )
    conn.execute(
        "UPDATE projection_groups SET total_workers = %s, generation = generation + 1, "
        "updated_at = now() WHERE projection_name = %s",
        (new_total, projection),
    )
    for worker_id in range(new_total):
        conn.execute(
            "INSERT INTO projection_checkpoints (projection_name, total_workers, worker_id, "
            "last_transaction_id, last_global_position) VALUES (%s, %s, %s, %s::text::xid8, %s) "
            "ON CONFLICT DO NOTHING",
            (projection, new_total, worker_id, str(start.transaction_id), start.global_position),
        )
    if old:
        log.warning(
            "projection %s rescaled from %d to %d partitions; new group starts at %s "
            "with %d skip-mark layer(s)",
            projection,
            old_total,
            new_total,
            start,
            len(layers),
        )
    return generation + 1


def load_layers(conn: Connection, projection: str) -> tuple[RetiredGroupMarks, ...]:
    rows = conn.execute(
        "SELECT generation, total_workers, worker_id, last_transaction_id::text, last_global_position "
        "FROM projection_skip_marks WHERE projection_name = %s ORDER BY generation, worker_id",
        (projection,),
    ).fetchall()
    return layers_from_rows(rows)


def layers_from_rows(rows: Iterable[Sequence[Any]]) -> tuple[RetiredGroupMarks, ...]:
    """Skip-mark layers from rows of (generation, total_workers, worker_id, transaction id, position)."""
    by_layer: dict[int, tuple[int, dict[int, Position]]] = {}
    for generation, total, worker_id, txid, pos in rows:
        by_layer.setdefault(int(generation), (int(total), {}))[1][int(worker_id)] = Position(
            int(txid), int(pos)
        )
    return tuple(
        RetiredGroupMarks(total, tuple(marks[k] for k in range(total)))
        for _, (total, marks) in sorted(by_layer.items())
    )


def load_checkpoint(conn: Connection, projection: str, partition: Partition) -> Position:
    """The partition's checkpoint, creating it at the start of the store if missing."""
    with conn.transaction():
        # Never for a partition count the group has left: _switch deleted those
        # rows, and one recreated at 0 would replay the partition next to the new group.
        conn.execute(
            "INSERT INTO projection_checkpoints (projection_name, total_workers, worker_id) "
            "SELECT %s, %s, %s WHERE NOT EXISTS (SELECT 1 FROM projection_groups "
            "WHERE projection_name = %s AND total_workers <> %s) ON CONFLICT DO NOTHING",
            (projection, partition.total_workers, partition.worker_id, projection, partition.total_workers),
        )
        row = conn.execute(
            "SELECT last_transaction_id::text, last_global_position FROM projection_checkpoints "
            "WHERE projection_name = %s AND total_workers = %s AND worker_id = %s",
            (projection, partition.total_workers, partition.worker_id),
        ).fetchone()
    if row is None:
        raise FencedError(
            f"projection {projection} no longer uses {partition.total_workers} partitions; "
            "rejoining its group"
        )
    return Position(int(row[0]), int(row[1]))


_SAVE = sql.SQL(
    "UPDATE projection_checkpoints SET last_transaction_id = %s::text::xid8, "
    "last_global_position = %s, events_processed = events_processed + %s, updated_at = now() "
    "WHERE projection_name = %s AND total_workers = %s AND worker_id = %s "
    "AND last_transaction_id = %s::text::xid8 AND last_global_position = %s"
)

# The database's clock at the update, the batch's last statement before its commit.
_RETURNING = sql.SQL(" RETURNING clock_timestamp()")

# This session still holds the partition's ownership lock (see ownership.py).
_LOCK_HELD = sql.SQL(
    " AND EXISTS (SELECT 1 FROM pg_locks l WHERE l.locktype = 'advisory' AND l.pid = pg_backend_pid()"
    " AND l.granted AND l.objsubid = 2"
    " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    " AND l.classid::bigint = (hashtext(%s)::bigint & 4294967295) AND l.objid::bigint = %s)"
)


def save_checkpoint(
    conn: Connection,
    projection: str,
    partition: Partition,
    expected: Position,
    new: Position,
    processed: int,
    *,
    lock_fence: bool = False,
) -> datetime:
    """Move the checkpoint from ``expected`` to ``new`` inside the caller's transaction.

    Compare-and-set: if the row is no longer at ``expected``, another process
    moved it (two owners of one partition), so raise :class:`FencedError` and
    let the caller roll back the batch, projection writes included.

    Returns the database's clock at the update, the batch's last statement
    before its commit: the "applied" end of the append-to-apply delay, read on
    the same clock as the events' ``created_at`` so that no host's clock skews it.

    ``lock_fence`` adds a second condition, checked by the server in the same
    statement: this session still holds the partition's ownership lock. An
    elastic worker releases partitions while it runs; with the fence, a batch
    of a partition it no longer holds cannot commit, whatever the client
    believes.
    """
    params: tuple[object, ...] = (
        str(new.transaction_id),
        new.global_position,
        processed,
        projection,
        partition.total_workers,
        partition.worker_id,
        str(expected.transaction_id),
        expected.global_position,
    )
    query: sql.SQL | sql.Composed = _SAVE
    if lock_fence:
        query = _SAVE + _LOCK_HELD
        params += (group_key(projection, partition.total_workers), partition.worker_id)
    row = conn.execute(query + _RETURNING, params).fetchone()
    if row is None:
        raise _moved(projection, partition, lock_fence=lock_fence)
    applied_at: datetime = row[0]
    return applied_at


def check_checkpoint(conn: Connection, projection: str, partition: Partition, expected: Position) -> None:
    """Raise :class:`FencedError` unless the partition's checkpoint is still at ``expected``."""
    row = conn.execute(
        "SELECT 1 FROM projection_checkpoints WHERE projection_name = %s AND total_workers = %s "
        "AND worker_id = %s AND last_transaction_id = %s::text::xid8 AND last_global_position = %s",
        (
            projection,
            partition.total_workers,
            partition.worker_id,
            str(expected.transaction_id),
            expected.global_position,
        ),
    ).fetchone()
    if row is None:
        raise _moved(projection, partition)


def _moved(projection: str, partition: Partition, *, lock_fence: bool = False) -> FencedError:
    # Another owner, or an operator (rebuild --force), moved the checkpoint.
    if lock_fence:
        return FencedError(
            f"checkpoint of {projection} partition {partition} not saved: it moved under us, or this "
            "session no longer holds the partition's ownership lock"
        )
    return FencedError(
        f"checkpoint of {projection} worker {partition} moved under us; another process owns this partition"
    )


_GROUP_PARTITIONS = sql.SQL("SELECT total_workers FROM projection_groups WHERE projection_name = %s")


def group_partitions(conn: Connection, projection: str) -> int | None:
    """The partition count of the projection's group, or ``None`` before any worker joined it."""
    row = conn.execute(_GROUP_PARTITIONS, (projection,)).fetchone()
    return int(row[0]) if row else None
