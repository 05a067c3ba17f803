"""Resetting a projection for a rebuild: its read model emptied, its checkpoints back to the start."""

from __future__ import annotations

from psycopg import sql

from projectionist.consume.checkpoints import group_partitions
from projectionist.consume.ownership import LIVE_WORKERS, group_key
from projectionist.consume.processor import SETUP_LOCK
from projectionist.consume.projection import Projection
from projectionist.errors import ConfigError
from projectionist.store.connection import Connection

_RESET_CHECKPOINTS = sql.SQL(
    "UPDATE projection_checkpoints SET last_transaction_id = '0', last_global_position = 0, "
    "events_processed = 0, updated_at = now() WHERE projection_name = %s"
)
_DROP_SKIP_MARKS = sql.SQL("DELETE FROM projection_skip_marks WHERE projection_name = %s")
_DROP_DEAD_LETTERS = sql.SQL("DELETE FROM dead_letters WHERE projection_name = %s")


def live_workers(conn: Connection, projection: str, partitions: int) -> list[int]:
    """The partitions of the group whose owners are running now."""
    return [int(r[0]) for r in conn.execute(LIVE_WORKERS, (group_key(projection, partitions),))]


def reset(conn: Connection, projection: Projection, default_partitions: int) -> int:
    """Empty the read model (``projection.reset``) and move every checkpoint back to the start.

    Runs in one transaction. Returns the group's partition count. Workers
    still running are fenced by the checkpoint compare-and-set: their next
    commit fails, they reload the reset checkpoint and continue from there.
    """
    reset_hook = getattr(projection, "reset", None)
    if not callable(reset_hook):
        raise ConfigError(f"projection {projection.name!r} has no reset(conn) hook; cannot rebuild")
    partitions = group_partitions(conn, projection.name) or default_partitions
    with conn.transaction():
        # The same lock workers take for setup, so a starting worker cannot
        # create the read model halfway through the reset.
        conn.execute(SETUP_LOCK, (projection.name,))
        projection.setup(conn)
        reset_hook(conn)
        conn.execute(_RESET_CHECKPOINTS, (projection.name,))
        conn.execute(_DROP_SKIP_MARKS, (projection.name,))
        # The letters describe the old read model; the replay parks again what still fails.
        conn.execute(_DROP_DEAD_LETTERS, (projection.name,))
    return partitions
