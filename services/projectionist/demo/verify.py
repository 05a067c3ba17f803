"""The demo's verdict, read back from the database: every event applied exactly once,
each aggregate on exactly one (the right) worker, and partition shares near 1/N.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from psycopg import sql

from projectionist.demo.sample_projection import READ_MODEL_TABLE, ScalableProjection
from projectionist.partitioning import partition_of
from projectionist.store.connection import Connection

# A worker's share may stray this far (relative) from 1/N: 15-35% for 4 workers.
# FNV-1a over the demo's 400 aggregate ids lands within a few points of 25%.
SHARE_TOLERANCE = 0.4
# How many offending aggregates a failed check names.
_SHOWN = 3


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass(frozen=True, slots=True)
class WorkerShare:
    worker_id: int
    events: int
    aggregates: int
    share: float


@dataclass(frozen=True, slots=True)
class Verification:
    total_workers: int
    events: int
    aggregates: int
    shares: tuple[WorkerShare, ...]
    checks: tuple[Check, ...]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def with_check(self, check: Check) -> Verification:
        return Verification(
            self.total_workers, self.events, self.aggregates, self.shares, (*self.checks, check)
        )


@dataclass(frozen=True, slots=True)
class _Aggregate:
    aggregate_id: str
    stored: int  # events in the store
    max_version: int
    applied: int | None  # None: the read model has no row for it
    last_version: int | None
    out_of_order: int | None
    worker_id: int | None
    total_workers: int | None
    workers: tuple[int, ...]


# A full join so that aggregates missing on either side show up.
_AGGREGATES = sql.SQL(
    """
    WITH e AS (
        SELECT aggregate_id, count(*) AS n, max(aggregate_version) AS v FROM events GROUP BY aggregate_id
    )
    SELECT coalesce(e.aggregate_id, r.aggregate_id), coalesce(e.n, 0), coalesce(e.v, 0),
           r.event_count, r.last_version, r.out_of_order, r.worker_id, r.total_workers, r.workers
    FROM e FULL JOIN {table} r ON r.aggregate_id = e.aggregate_id
    ORDER BY 1
    """
).format(table=sql.Identifier(READ_MODEL_TABLE))


def verify(conn: Connection, total_workers: int, projection: str = ScalableProjection.name) -> Verification:
    """Check the sample read model against the events table; never modifies anything."""
    rows = [
        _Aggregate(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], tuple(r[8] or ()))
        for r in conn.execute(_AGGREGATES).fetchall()
    ]
    row = conn.execute("SELECT count(*) FROM events").fetchone()
    events = int(row[0]) if row else 0
    processed: dict[int, int] = dict(
        conn.execute(
            "SELECT worker_id, events_processed FROM projection_checkpoints "
            "WHERE projection_name = %s AND total_workers = %s",
            (projection, total_workers),
        ).fetchall()
    )
    shares = _shares(rows, total_workers)
    checks = (
        _exactly_once(rows, events),
        _in_order(rows),
        _one_worker(rows, total_workers),
        _checkpoints(processed, shares, events),
        _balanced(shares, total_workers),
    )
    return Verification(total_workers, events, len(rows), shares, checks)


def _names(bad: Sequence[str]) -> str:
    more = f" and {len(bad) - _SHOWN} more" if len(bad) > _SHOWN else ""
    return ", ".join(bad[:_SHOWN]) + more


def _exactly_once(rows: Sequence[_Aggregate], events: int) -> Check:
    name = "every event applied exactly once"
    applied = sum(a.applied or 0 for a in rows)
    bad = [
        f"{a.aggregate_id} ({a.stored} stored, {a.applied or 0} applied)"
        for a in rows
        if a.applied != a.stored
    ]
    if bad or applied != events:
        return Check(name, False, f"{applied:,} applied for {events:,} events; wrong: {_names(bad)}")
    return Check(name, True, f"{events:,} events, {applied:,} applications, {len(rows)} aggregates")


def _in_order(rows: Sequence[_Aggregate]) -> Check:
    name = "per-aggregate order preserved"
    bad = [
        f"{a.aggregate_id} (last version {a.last_version}, {a.out_of_order} out of order)"
        for a in rows
        if a.applied is not None and (a.out_of_order != 0 or a.last_version != a.max_version)
    ]
    if bad:
        return Check(name, False, f"{len(bad)} aggregates: {_names(bad)}")
    return Check(name, True, "0 out-of-order applications; every last_version is the stream's last")


def _one_worker(rows: Sequence[_Aggregate], total_workers: int) -> Check:
    name = "each aggregate handled by exactly one worker"
    bad = []
    for a in rows:
        if a.applied is None:
            continue
        owner = partition_of(a.aggregate_id, total_workers)
        if a.workers != (owner,) or a.worker_id != owner or a.total_workers != total_workers:
            bad.append(f"{a.aggregate_id} (workers {list(a.workers)}, FNV-1a partition {owner})")
    if bad:
        return Check(name, False, f"{len(bad)} aggregates: {_names(bad)}")
    return Check(name, True, f"each on its FNV-1a partition of {total_workers}")


def _shares(rows: Sequence[_Aggregate], total_workers: int) -> tuple[WorkerShare, ...]:
    events = [0] * total_workers
    aggregates = [0] * total_workers
    for a in rows:
        if a.applied is not None and a.worker_id is not None and 0 <= a.worker_id < total_workers:
            events[a.worker_id] += a.applied
            aggregates[a.worker_id] += 1
    total = sum(events) or 1
    return tuple(WorkerShare(k, events[k], aggregates[k], events[k] / total) for k in range(total_workers))


def _checkpoints(processed: dict[int, int], shares: Sequence[WorkerShare], events: int) -> Check:
    # The checkpoint counter moves in the same transaction as the read model, so
    # the two must agree exactly; a mismatch means a batch committed half-way.
    name = "checkpoints agree with the read model"
    bad = [
        f"worker {s.worker_id}: checkpoint {processed.get(s.worker_id, 0):,}, read model {s.events:,}"
        for s in shares
        if processed.get(s.worker_id, 0) != s.events
    ]
    total = sum(processed.values())
    if bad or total != events:
        return Check(name, False, f"{total:,} processed for {events:,} events; {_names(bad)}")
    return Check(name, True, f"{total:,} events processed in total")


def _balanced(shares: Sequence[WorkerShare], total_workers: int) -> Check:
    expected = 1 / total_workers
    low, high = expected * (1 - SHARE_TOLERANCE), expected * (1 + SHARE_TOLERANCE)
    name = f"shares near {expected:.0%}"
    text = ", ".join(f"worker {s.worker_id} {s.share:.1%}" for s in shares)
    ok = all(low <= s.share <= high for s in shares)
    return Check(name, ok, f"{text} (allowed {low:.0%}-{high:.0%})")


def format_verification(v: Verification, unit: str = "worker") -> list[str]:
    """The lines the demo prints: one per check, the shares, then the verdict.

    ``unit`` names what owns a share: a worker in the static demo, a partition in the elastic one.
    """
    lines = [f"Verification ({v.events:,} events, {v.aggregates} aggregates, {v.total_workers} {unit}s):"]
    lines += [f"  {'PASS' if c.ok else 'FAIL'}  {c.name}: {c.detail}" for c in v.checks]
    lines.append(f"  share per {unit}:")
    lines += [
        f"    {unit} {s.worker_id}: {s.events:>8,} events  {s.aggregates:>4} aggregates  {s.share:6.1%}"
        for s in v.shares
    ]
    failed = [c.name for c in v.checks if not c.ok]
    if failed:
        lines.append(f"FAIL: {len(failed)} of {len(v.checks)} checks failed: {'; '.join(failed)}")
    else:
        lines.append(f"PASS: all {len(v.checks)} checks passed")
    return lines
