"""Lag: how far behind every partition of a projection's group is, read from the store.

Every partition of each group is reported, running or not, in two round
trips; a scrape counts at most ``cap`` events a partition, exactly through
the partition's own index. How and why: ``docs/design/lag.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from psycopg import sql

from projectionist.consume import partition_indexes
from projectionist.consume.checkpoints import layers_from_rows
from projectionist.consume.reader import RetiredGroupMarks, skip_filter
from projectionist.store.connection import Connection


@dataclass(frozen=True, slots=True)
class PartitionLag:
    projection: str
    worker_id: int
    total_workers: int
    checkpoint_position: int
    lag_events: int
    lag_seconds: float


@dataclass(frozen=True, slots=True)
class StoreLag:
    """The store's head and oldest transaction, and every partition's lag."""

    head_position: int
    oldest_transaction_age_seconds: float
    partitions: list[PartitionLag]


# The groups of the projections asked for, per group the partitions that
# can count through their own index (a single partition always can), and
# the group's skip marks (in load_layers' row form, as JSON).
_GROUPS = sql.SQL(
    """
    SELECT g.projection_name, g.total_workers,
           ARRAY(SELECT k FROM generate_series(0, g.total_workers - 1) AS s(k)
                 WHERE g.total_workers = 1 OR {ready}) AS ready,
           (SELECT coalesce(json_agg(json_build_array(m.generation, m.total_workers, m.worker_id,
                                                      m.last_transaction_id::text, m.last_global_position)
                                     ORDER BY m.generation, m.worker_id), '[]')
            FROM projection_skip_marks m WHERE m.projection_name = g.projection_name) AS marks
    FROM projection_groups g
    WHERE %(projections)s::text[] IS NULL OR g.projection_name = ANY(%(projections)s)
    ORDER BY g.projection_name
    """
).format(ready=partition_indexes.ready_condition(sql.SQL("g.total_workers"), sql.SQL("s.k")))

# The head is read from the identity sequence (O(1)). The age of the oldest
# transaction that holds a transaction id is what holds back the gap-safe
# read fence (pg_snapshot_xmin) for every reader in the cluster, so it is
# the first thing to look at when lag grows; prepared transactions hold it
# back too.
_STORE = sql.SQL(
    """
    SELECT (SELECT CASE WHEN is_called THEN last_value ELSE 0 END
            FROM events_global_position_seq) AS head,
           (SELECT coalesce(extract(epoch FROM clock_timestamp() - min(o.started)), 0)::float8
            FROM (SELECT a.xact_start AS started FROM pg_stat_activity a
                  WHERE a.backend_xid IS NOT NULL
                  UNION ALL
                  SELECT x.prepared FROM pg_prepared_xacts x) o) AS oldest_xact_age
    """
)

_AFTER_CHECKPOINT = sql.SQL(
    "(e.transaction_id, e.global_position)"
    " > (coalesce(c.last_transaction_id, '0'::xid8), coalesce(c.last_global_position, 0))"
)

# Through the main index, in order, with the filter applied to the window
# only. The partition count comes from the table, not from the text: with
# the window's size a literal, the planner's estimate for it grew with N and
# tipped the plan into a sequential scan plus a sort of the table's remainder
# (EXPLAIN, 16 partitions).
# The age of the oldest unapplied event, never negative: a created_at that
# raw SQL set to 'infinity' or a far year (see store/lenient_timestamps.py) would otherwise
# put -inf or minus centuries into the lag gauges until the row is parked.
_AGE = sql.SQL(
    "greatest(coalesce(extract(epoch FROM clock_timestamp()"
    " - CASE WHEN isfinite(lag.oldest) THEN lag.oldest END), 0), 0)::float8"
)

_UNINDEXED = sql.SQL(
    """
    SELECT g.projection_name, g.total_workers, k.worker_id,
           coalesce(c.last_global_position, 0) AS checkpoint, lag.n,
           {age} AS lag_seconds
    FROM projection_groups g
    CROSS JOIN unnest({worker_ids}::int[]) AS k(worker_id)
    LEFT JOIN projection_checkpoints c
      ON c.projection_name = g.projection_name
     AND c.total_workers = g.total_workers
     AND c.worker_id = k.worker_id
    CROSS JOIN LATERAL (
        SELECT count(*) FILTER (WHERE w.partition_hash % g.total_workers = k.worker_id) AS n,
               min(w.created_at) FILTER (WHERE w.partition_hash % g.total_workers = k.worker_id) AS oldest
        FROM (SELECT e.partition_hash, e.created_at FROM events e WHERE {after}{window}) w
    ) lag
    WHERE g.projection_name = {projection}
    """
)

# Through the partition's own index: the plain predicate selects it.
_INDEXED = sql.SQL(
    """
    SELECT {projection}::text AS projection_name, {n}::int AS total_workers, {k}::int AS worker_id,
           coalesce(c.last_global_position, 0) AS checkpoint, lag.n,
           {age} AS lag_seconds
    FROM (SELECT) one
    LEFT JOIN projection_checkpoints c
      ON c.projection_name = {projection} AND c.total_workers = {n} AND c.worker_id = {k}
    CROSS JOIN LATERAL (
        SELECT (SELECT count(*) FROM (SELECT FROM events e WHERE {mine} AND {after}{limit}) w) AS n,
               (SELECT e.created_at FROM events e WHERE {mine} AND {after}
                ORDER BY e.transaction_id, e.global_position LIMIT 1) AS oldest
        -- Kept a subquery, so that the age's two mentions of oldest read it once.
        OFFSET 0
    ) lag
    """
)


def _group_queries(
    projection: str,
    total_workers: int,
    ready: set[int],
    cap: int | None,
    layers: tuple[RetiredGroupMarks, ...] = (),
) -> list[sql.Composed]:
    """One query for each partition that has its index, and one for the rest of the group."""
    n = sql.Literal(total_workers)
    # Events a retired group already applied (skip marks) are not lag.
    after = (
        _AFTER_CHECKPOINT
        if not layers
        else sql.SQL("{} AND NOT ({})").format(
            _AFTER_CHECKPOINT, skip_filter(layers, alias="e", with_params=False)
        )
    )
    # The capped count walks in index order: without the ORDER BY, a
    # caught-up partition of a table whose visibility map lags behind got a
    # sequential scan of the whole table (its estimate of the rows after the
    # checkpoint is a third of the table; EXPLAIN on 1M rows: 200 ms).
    # An exact count needs no order: min() finds the oldest either way.
    limit = (
        sql.SQL("")
        if cap is None
        else sql.SQL(" ORDER BY e.transaction_id, e.global_position LIMIT {}").format(sql.Literal(cap))
    )
    window = (
        sql.SQL("")
        if cap is None
        else sql.SQL(
            " ORDER BY e.transaction_id, e.global_position LIMIT {}::bigint * g.total_workers"
        ).format(sql.Literal(cap))
    )
    queries = [
        _INDEXED.format(
            projection=sql.Literal(projection),
            n=n,
            k=sql.Literal(k),
            mine=sql.SQL("true")
            if total_workers == 1
            else sql.SQL("e.partition_hash % {} = {}").format(n, sql.Literal(k)),
            after=after,
            limit=limit,
            age=_AGE,
        )
        for k in sorted(ready)
    ]
    rest = [k for k in range(total_workers) if k not in ready]
    if rest:
        queries.append(
            _UNINDEXED.format(
                worker_ids=sql.Literal(rest),
                after=after,
                window=window,
                projection=sql.Literal(projection),
                age=_AGE,
            )
        )
    return queries


def read_lag(conn: Connection, projections: Sequence[str] | None, cap: int | None) -> StoreLag:
    """The store's head, its oldest transaction, and the lag of every partition of ``projections``' groups.

    ``projections=None`` reads every group. ``cap=None`` counts exactly, however
    far behind a partition is (``projectionist status``; a scrape must not).
    """
    names = None if projections is None else list(projections)
    parts = [
        query
        for name, total, ready, marks in conn.execute(_GROUPS, {"projections": names})
        for query in _group_queries(str(name), int(total), set(ready), cap, layers_from_rows(marks))
    ]
    rows = []
    if parts:
        query = sql.SQL(
            "WITH store AS ({store}) SELECT store.*, p.* FROM store CROSS JOIN ({parts}) p"
            " ORDER BY p.projection_name, p.worker_id"
        ).format(store=_STORE, parts=sql.SQL(" UNION ALL ").join(sql.SQL("({})").format(p) for p in parts))
        # No parameters: the partitions' numbers are literals (see the module
        # docstring), so psycopg sends the text as it is and its % stay operators.
        rows = conn.execute(query).fetchall()
    if not rows:  # no group yet, or it went between the two queries
        rows = conn.execute(_STORE).fetchall()
        return StoreLag(int(rows[0][0]), float(rows[0][1]), [])
    return StoreLag(
        int(rows[0][0]),
        float(rows[0][1]),
        [
            PartitionLag(
                projection=r[2],
                total_workers=int(r[3]),
                worker_id=int(r[4]),
                checkpoint_position=int(r[5]),
                lag_events=int(r[6]),
                lag_seconds=float(r[7]),
            )
            for r in rows
        ],
    )
