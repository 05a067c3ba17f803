"""Projections the benchmark runs, in process and in ``projectionist worker`` subprocesses.

Subprocesses load them with ``--projection bench.projections:NoopProjection``;
the CLI passes no arguments, so the name and the start gate come from
``BENCH_PROJECTION_NAME`` and ``BENCH_GATE_KEY``.

**The start gate.** A partitioned run must time processing, not interpreter
start-up. Each worker's ``setup`` (which runs after it has connected, migrated
and taken its partition) waits on a shared advisory lock that the benchmark
holds exclusively; the benchmark starts the clock and releases the lock once
all N workers are waiting. Waiting on an advisory lock assigns no transaction
id, so a waiting worker does not fence the others' gap-safe reads.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from bench.data import READ_MODEL_DDL, READ_MODEL_UPSERT, coalesce
from projectionist.consume.projection import BaseProjection, Tx
from projectionist.records import RecordedEvent
from projectionist.store.connection import Connection


def _wait_at_gate(conn: Connection) -> None:
    key = os.environ.get("BENCH_GATE_KEY")
    if key:
        conn.execute("SELECT pg_advisory_xact_lock_shared(%s)", (int(key),))


class NoopProjection(BaseProjection):
    """Applies nothing: catch-up then measures reading, decoding and checkpointing alone."""

    name = "bench_noop"

    def __init__(self, name: str | None = None) -> None:
        self.name = name or os.environ.get("BENCH_PROJECTION_NAME") or type(self).name

    def setup(self, conn: Connection) -> None:
        _wait_at_gate(conn)

    def apply(self, event: RecordedEvent, tx: Tx) -> None:
        pass

    # The cheapest no-op a user could write: no Python call per event, as the
    # raw scan makes none. The events are read, decoded and built all the same.
    def apply_batch(self, events: Sequence[RecordedEvent], tx: Tx) -> None:
        pass


class ReadModelProjection(BaseProjection):
    """The small read model every contestant builds: one upsert per aggregate per batch."""

    name = "bench_read_model"

    def __init__(self, name: str | None = None) -> None:
        self.name = name or os.environ.get("BENCH_PROJECTION_NAME") or type(self).name

    def setup(self, conn: Connection) -> None:
        _wait_at_gate(conn)
        conn.execute(READ_MODEL_DDL)

    def apply(self, event: RecordedEvent, tx: Tx) -> None:
        self.apply_batch([event], tx)

    def apply_batch(self, events: Sequence[RecordedEvent], tx: Tx) -> None:
        tx.executemany(READ_MODEL_UPSERT, coalesce([(e.aggregate_id, e.global_position) for e in events]))


LATENCY_DDL = """
CREATE TABLE IF NOT EXISTS bench_applied (
    global_position bigint NOT NULL,
    worker_id       integer NOT NULL,
    applied_at      timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""


class LatencyProjection(BaseProjection):
    """Writes one row per event; the row's commit time is when the event became "applied".

    The latency workload compares ``pg_xact_commit_timestamp`` of this row with
    that of the event row (see :mod:`bench.latency`).
    """

    name = "bench_latency"

    def __init__(self, name: str | None = None) -> None:
        self.name = name or os.environ.get("BENCH_PROJECTION_NAME") or type(self).name

    def setup(self, conn: Connection) -> None:
        conn.execute(LATENCY_DDL)

    def apply(self, event: RecordedEvent, tx: Tx) -> None:
        self.apply_batch([event], tx)

    def apply_batch(self, events: Sequence[RecordedEvent], tx: Tx) -> None:
        tx.execute(
            "INSERT INTO bench_applied (global_position, worker_id) "
            "SELECT p, %s FROM unnest(%s::int8[]) AS p",
            (tx.worker_id, [e.global_position for e in events]),
        )
