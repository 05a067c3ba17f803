"""Verification of an experiment whose partition count changed (``projectionist rescale``).

Without a rescale the experiment uses the demo's :func:`projectionist.demo.verify.verify`.
After ``N -> M`` an aggregate may have been handled by two workers, one per
partitioning, so "each aggregate by exactly one worker" becomes "by at most
its owner under N and its owner under M". Exactly-once and order are checked
as strictly as ever: a rescale must neither replay nor skip.
"""

from __future__ import annotations

from psycopg import sql

from projectionist.demo.sample_projection import READ_MODEL_TABLE
from projectionist.demo.verify import Check, Verification, WorkerShare
from projectionist.partitioning import partition_of
from projectionist.store.connection import Connection

_SHOWN = 3

_AGGREGATES = sql.SQL(
    """
    WITH e AS (
        SELECT aggregate_id, count(*) AS n, max(aggregate_version) AS v FROM events GROUP BY aggregate_id
    )
    SELECT coalesce(e.aggregate_id, r.aggregate_id), coalesce(e.n, 0), coalesce(e.v, 0),
           coalesce(r.event_count, 0), r.last_version, coalesce(r.out_of_order, 0), r.workers
    FROM e FULL JOIN {table} r ON r.aggregate_id = e.aggregate_id
    ORDER BY 1
    """
).format(table=sql.Identifier(READ_MODEL_TABLE))


def _names(bad: list[str]) -> str:
    more = f" and {len(bad) - _SHOWN} more" if len(bad) > _SHOWN else ""
    return ", ".join(bad[:_SHOWN]) + more


def verify_rescaled(conn: Connection, old_total: int, new_total: int) -> Verification:
    rows = conn.execute(_AGGREGATES).fetchall()
    events = sum(int(r[1]) for r in rows)
    applied = sum(int(r[3]) for r in rows)
    miscounted = [f"{r[0]} ({r[1]} stored, {r[3]} applied)" for r in rows if r[1] != r[3]]
    disordered = [
        f"{r[0]} (last version {r[4]}, {r[5]} out of order)"
        for r in rows
        if r[3] and (r[5] != 0 or r[4] != r[2])
    ]
    strays = []
    for r in rows:
        owners = {partition_of(r[0], old_total), partition_of(r[0], new_total)}
        if r[3] and not set(r[6] or ()) <= owners:
            strays.append(f"{r[0]} (workers {list(r[6] or ())}, owners {sorted(owners)})")
    checks = (
        Check(
            "every event applied exactly once",
            not miscounted and applied == events,
            f"{events:,} events, {applied:,} applications, {len(rows)} aggregates"
            + (f"; wrong: {_names(miscounted)}" if miscounted else ""),
        ),
        Check(
            "per-aggregate order preserved",
            not disordered,
            f"{len(disordered)} aggregates: {_names(disordered)}"
            if disordered
            else "0 out-of-order applications",
        ),
        Check(
            f"each aggregate handled only by its owner under {old_total} and under {new_total} partitions",
            not strays,
            f"{len(strays)} aggregates: {_names(strays)}" if strays else "no aggregate on another worker",
        ),
    )
    # Shares under the new partitioning: how the events divide among its workers.
    per_worker = [0] * new_total
    per_worker_aggregates = [0] * new_total
    for r in rows:
        owner = partition_of(r[0], new_total)
        per_worker[owner] += int(r[1])
        per_worker_aggregates[owner] += 1
    shares = tuple(
        WorkerShare(k, per_worker[k], per_worker_aggregates[k], per_worker[k] / (events or 1))
        for k in range(new_total)
    )
    return Verification(new_total, events, len(rows), shares, checks)
