"""Checkpoints and worker groups: where each worker is, and the partition count it uses."""

from __future__ import annotations

from projectionist.db import Connection
from projectionist.errors import ConfigError, FencedError
from projectionist.reader import Partition
from projectionist.records import Position


def register_group(conn: Connection, projection: str, total_workers: int) -> None:
    """Record the projection's partition count, or refuse a different one.

    A different count is accepted only while no checkpoint of the old group has
    moved: then nothing was processed under the old modulus and nothing can be
    skipped. Otherwise the worker is refused (safe rescaling is its own feature).
    """
    with conn.transaction():
        # FOR UPDATE serialises workers of one projection starting together, so
        # two of them cannot both "switch" the group to different counts.
        conn.execute(
            "INSERT INTO projection_groups (projection_name, total_workers) VALUES (%s, %s) "
            "ON CONFLICT (projection_name) DO NOTHING",
            (projection, total_workers),
        )
        row = conn.execute(
            "SELECT total_workers FROM projection_groups WHERE projection_name = %s FOR UPDATE",
            (projection,),
        ).fetchone()
        assert row is not None
        current = int(row[0])
        if current == total_workers:
            return
        moved = conn.execute(
            "SELECT count(*) FROM projection_checkpoints "
            "WHERE projection_name = %s AND total_workers = %s AND last_global_position > 0",
            (projection, current),
        ).fetchone()
        if moved and moved[0]:
            raise ConfigError(
                f"TOTAL_WORKERS={total_workers} differs from the {current} partitions "
                f"projection {projection!r} already uses; start every worker with "
                f"TOTAL_WORKERS={current} (changing the partition count needs a rebuild)"
            )
        conn.execute(
            "UPDATE projection_groups SET total_workers = %s, updated_at = now() WHERE projection_name = %s",
            (total_workers, projection),
        )
        conn.execute(
            "DELETE FROM projection_checkpoints WHERE projection_name = %s AND total_workers = %s",
            (projection, current),
        )


def load_checkpoint(conn: Connection, projection: str, partition: Partition) -> Position:
    """The partition's checkpoint, creating it at the start of the store if missing."""
    with conn.transaction():
        conn.execute(
            "INSERT INTO projection_checkpoints (projection_name, total_workers, worker_id) "
            "VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
            (projection, partition.total_workers, partition.worker_id),
        )
        row = conn.execute(
            "SELECT last_transaction_id::text, last_global_position FROM projection_checkpoints "
            "WHERE projection_name = %s AND total_workers = %s AND worker_id = %s",
            (projection, partition.total_workers, partition.worker_id),
        ).fetchone()
    assert row is not None
    return Position(int(row[0]), int(row[1]))


def save_checkpoint(
    conn: Connection,
    projection: str,
    partition: Partition,
    expected: Position,
    new: Position,
    processed: int,
) -> None:
    """Move the checkpoint from ``expected`` to ``new`` inside the caller's transaction.

    Compare-and-set: if the row is no longer at ``expected``, another process
    moved it (two owners of one partition), so raise :class:`FencedError` and
    let the caller roll back the batch, projection writes included.
    """
    cur = conn.execute(
        "UPDATE projection_checkpoints SET last_transaction_id = %s::text::xid8, "
        "last_global_position = %s, events_processed = events_processed + %s, updated_at = now() "
        "WHERE projection_name = %s AND total_workers = %s AND worker_id = %s "
        "AND last_transaction_id = %s::text::xid8 AND last_global_position = %s",
        (
            str(new.transaction_id),
            new.global_position,
            processed,
            projection,
            partition.total_workers,
            partition.worker_id,
            str(expected.transaction_id),
            expected.global_position,
        ),
    )
    if cur.rowcount != 1:
        raise FencedError(
            f"checkpoint of {projection} worker {partition} moved under us; "
            "another process owns this partition"
        )
