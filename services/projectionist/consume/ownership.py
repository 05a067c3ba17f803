"""Partition ownership: one session advisory lock per (projection, partition count, partition).

The partition count is part of the key so that, during a rescale, the old
group's workers and the new group's workers never contend for each other's
locks, and "is the old group still running?" is a plain lock lookup.
"""

from __future__ import annotations

from psycopg import sql


def group_key(projection: str, total_workers: int) -> str:
    return f"{projection}/{total_workers}"


# Two-int4 form: (hashtext(projection/total), worker). pg_locks shows it with
# objsubid = 2, classid = the first key as an unsigned oid, objid = the second.
TRY_LOCK = sql.SQL("SELECT pg_try_advisory_lock(hashtext(%s), %s)")

LIVE_WORKERS = sql.SQL(
    """
    SELECT l.objid::bigint::int AS worker_id
    FROM pg_locks l
    WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND l.classid::bigint = (hashtext(%s)::bigint & 4294967295)
    """
)

#: The same test as a boolean expression over a checkpoint row aliased ``c``.
LIVE_EXPR = sql.SQL(
    """EXISTS (
        SELECT 1 FROM pg_locks l
        WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
          AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
          AND l.classid::bigint
              = (hashtext(c.projection_name || '/' || c.total_workers)::bigint & 4294967295)
          AND l.objid::bigint = c.worker_id
    )"""
)
