"""Projections used by the tests, loadable by worker subprocesses as ``tests.projections:Recorder``."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from projectionist.consume.projection import BaseProjection, Tx
from projectionist.demo.sample_events import append_sample_events
from projectionist.errors import ConfigError
from projectionist.records import RecordedEvent
from projectionist.store.connection import Connection
from projectionist.testing import poll_until, wait_until_readable

if TYPE_CHECKING:
    from projectionist.consume.processor import Processor


class Recorder(BaseProjection):
    """Records every application of every event, so duplicates and gaps are countable.

    No unique constraint on purpose: a double application must show up as two
    rows, not as an error that hides it. ``RECORDER_SLEEP`` (seconds per batch)
    widens the window in which a test can kill the process mid-batch. Each row
    also records when (the database's clock) and by which session it was
    applied, for the elastic measurements (chaos/elastic.py).
    """

    name = "recorder"

    def __init__(self, name: str | None = None) -> None:
        if name is not None:
            self.name = name
        self.sleep = float(os.environ.get("RECORDER_SLEEP", "0"))

    def setup(self, conn: Connection) -> None:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS applied_events ("
            " seq bigserial PRIMARY KEY, projection text NOT NULL, event_id uuid NOT NULL,"
            " aggregate_id text NOT NULL, aggregate_version bigint NOT NULL,"
            " global_position bigint NOT NULL, worker_id int NOT NULL, total_workers int NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT clock_timestamp(),"
            " applied_by int NOT NULL DEFAULT pg_backend_pid())"
        )

    def reset(self, conn: Connection) -> None:
        conn.execute("DELETE FROM applied_events WHERE projection = %s", (self.name,))

    def apply(self, event: RecordedEvent, tx: Tx) -> None:
        self.apply_batch([event], tx)

    def apply_batch(self, events: Sequence[RecordedEvent], tx: Tx) -> None:
        tx.executemany(
            "INSERT INTO applied_events (projection, event_id, aggregate_id, aggregate_version,"
            " global_position, worker_id, total_workers) VALUES (%s, %s, %s, %s, %s, %s, %s)",
            [
                (
                    self.name,
                    e.event_id,
                    e.aggregate_id,
                    e.aggregate_version,
                    e.global_position,
                    tx.worker_id,
                    tx.total_workers,
                )
                for e in events
            ],
        )
        if self.sleep:
            time.sleep(self.sleep)


def load_sample(conn: Connection, count: int, aggregates: int) -> None:
    """The sample appender's events in batches of 200, the same for a given count; readable on return."""
    for _ in append_sample_events(conn, count=count, aggregates=aggregates, batch_size=200, seed=7):
        pass
    wait_until_readable(conn)


def drain(conn: Connection, processor: Processor, timeout: float = 10.0) -> None:
    """Run batches until the processor's checkpoint reaches the store's newest event.

    Not just until a batch finds nothing new: the session's Prometheus stack
    writes to another database of the same server, and its open transactions
    hold the cluster-wide read fence back for a moment now and then.
    """
    row = conn.execute("SELECT coalesce(max(global_position), 0) FROM events").fetchone()
    head = int(row[0]) if row else 0

    def at_head() -> bool:
        if processor.position is not None and processor.position.global_position == head:
            return True
        if not processor.run_batch(conn).more:
            time.sleep(0.01)
        return False

    # No pause between batches that found more: the predicate itself waits when one found nothing.
    if poll_until(at_head, timeout, interval=0) is None:
        raise AssertionError(f"{processor.partition} at {processor.position}, head {head}")


def applied_count(conn: Connection) -> int:
    """Applications recorded so far; 0 before the first worker created the table."""
    exists = conn.execute("SELECT to_regclass('applied_events') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return 0
    row = conn.execute("SELECT count(*) FROM applied_events").fetchone()
    return int(row[0]) if row else 0


def verify_exactly_once(conn: Connection, projection: str = "recorder") -> dict[str, int]:
    """Compare what was applied with the events table: counts of lost, duplicated, misordered."""
    lost = conn.execute(
        "SELECT count(*) FROM events e WHERE NOT EXISTS ("
        " SELECT 1 FROM applied_events a WHERE a.event_id = e.event_id AND a.projection = %s)",
        (projection,),
    ).fetchone()
    duplicated = conn.execute(
        "SELECT coalesce(sum(n - 1), 0) FROM ("
        " SELECT count(*) AS n FROM applied_events WHERE projection = %s GROUP BY event_id) d",
        (projection,),
    ).fetchone()
    # Per aggregate, application order (seq) must follow version order.
    misordered = conn.execute(
        "SELECT count(*) FROM ("
        " SELECT aggregate_version,"
        "        lag(aggregate_version) OVER (PARTITION BY aggregate_id ORDER BY seq) AS prev"
        " FROM applied_events WHERE projection = %s) o"
        " WHERE prev IS NOT NULL AND aggregate_version <> prev + 1",
        (projection,),
    ).fetchone()
    wrong_worker = conn.execute(
        "SELECT count(*) FROM applied_events a JOIN events e USING (event_id)"
        " WHERE a.projection = %s AND e.partition_hash %% a.total_workers <> a.worker_id",
        (projection,),
    ).fetchone()
    assert lost and duplicated and misordered and wrong_worker
    return {
        "lost": int(lost[0]),
        "duplicated": int(duplicated[0]),
        "misordered": int(misordered[0]),
        "wrong_worker": int(wrong_worker[0]),
    }


class SetupFailsInWorkers(Recorder):
    """Sets up once in a process, then fails: stands for a worker that dies of an error no restart fixes.

    ``projectionist rebuild`` calls ``setup`` itself before it starts its own
    workers, so its workers are the ones that fail.
    """

    name = "setup_fails_in_workers"
    calls = 0

    def setup(self, conn: Connection) -> None:
        type(self).calls += 1
        if type(self).calls > 1:
            raise ConfigError("this projection's setup fails in every worker")
        super().setup(conn)


class PoisonSensitive(Recorder):
    """Raises on events whose payload has ``"poison": true`` until ``healed`` is set.

    ``healed`` is read from the table ``poison_healed`` so that a worker
    subprocess can be healed by a test, as an operator would fix a bug.
    """

    name = "poison_sensitive"

    def apply_batch(self, events: Sequence[RecordedEvent], tx: Tx) -> None:
        for event in events:
            if event.payload.get("poison") and not self._healed(tx):
                raise ValueError(f"cannot project {event.aggregate_id} v{event.aggregate_version}")
        super().apply_batch(events, tx)

    @staticmethod
    def _healed(tx: Tx) -> bool:
        row = tx.execute("SELECT to_regclass('poison_healed') IS NOT NULL").fetchone()
        return bool(row and row[0])
