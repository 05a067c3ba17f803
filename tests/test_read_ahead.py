"""Read-ahead: a full batch sends the next batch's read before its own rows are decoded.

The read-ahead must never change what is applied: it is used only when the
next batch starts exactly where it was read from. These tests look at the
processor's pending read-ahead (a private attribute) because its effect is
otherwise only speed, which a test must not time.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from projectionist.consume.processor import Processor
from projectionist.consume.projection import Tx
from projectionist.consume.reader import PartitionReader
from projectionist.demo.sample_events import append_sample_events
from projectionist.errors import ProjectionError
from projectionist.partitioning import Partition, partition_of
from projectionist.records import Position, RecordedEvent
from projectionist.store.connection import Connection, connect
from projectionist.testing import wait_until_readable
from tests.projections import Recorder, drain, verify_exactly_once

pytestmark = pytest.mark.integration


def _load(conn: Connection, count: int, aggregates: int) -> None:
    for _ in append_sample_events(conn, count=count, aggregates=aggregates, batch_size=100, seed=11):
        pass
    wait_until_readable(conn)


@pytest.mark.parametrize("total_workers", [1, 3])
def test_the_peeked_start_of_the_next_batch_is_where_the_batch_ends(
    conn: Connection, total_workers: int
) -> None:
    # next_start converts one row to guess where a full batch ends; a wrong
    # guess would silently waste every read-ahead, so it must agree exactly.
    _load(conn, 1000, 37)
    per_partition = [0] * total_workers
    for agg, n in conn.execute("SELECT aggregate_id, count(*) FROM events GROUP BY 1"):
        per_partition[partition_of(agg, total_workers)] += n
    for k in range(total_workers):
        reader = PartitionReader(Partition(k, total_workers), batch_size=64)
        position, full_batches = Position(), 0
        while True:
            with conn.transaction():
                pending = reader.send(conn, position)
                guess = pending.next_start()
                batch = pending.batch()
            if batch.end is None:
                break
            assert guess == (batch.end if batch.more else None)
            full_batches += batch.more
            position = batch.end
        assert full_batches == per_partition[k] // 64


@pytest.mark.parametrize("total_workers", [1, 2])
def test_full_batches_read_ahead_and_apply_every_event_once(conn: Connection, total_workers: int) -> None:
    _load(conn, 1050, 23)
    per_partition = [0] * total_workers
    for agg, n in conn.execute("SELECT aggregate_id, count(*) FROM events GROUP BY 1"):
        per_partition[partition_of(agg, total_workers)] += n
    for k in range(total_workers):
        processor = Processor(Recorder(), Partition(k, total_workers), batch_size=100)
        processor.start(conn)
        read_ahead = 0
        while (outcome := processor.run_batch(conn)).visible:
            pending = processor._read_ahead
            # A full batch leaves the next read in flight, starting where it committed.
            assert (pending is not None) == outcome.more
            if pending is not None:
                assert pending.after == processor.position
                read_ahead += 1
        assert read_ahead == per_partition[k] // 100
        # Each event row crossed the wire once: the read-ahead is the next
        # batch's read, not an extra one.
        assert processor.reader.rows_fetched == per_partition[k]
    assert verify_exactly_once(conn) == {"lost": 0, "duplicated": 0, "misordered": 0, "wrong_worker": 0}


class _FailsOnSecondBatch(Recorder):
    def __init__(self) -> None:
        super().__init__()
        self.batches = 0

    def apply_batch(self, events: Sequence[RecordedEvent], tx: Tx) -> None:
        self.batches += 1
        if self.batches == 2:
            raise RuntimeError("boom")
        super().apply_batch(events, tx)


def test_a_rolled_back_batch_reads_again_from_its_checkpoint(conn: Connection) -> None:
    # The failed batch had already sent the read of the batch after it; using
    # that read would skip the failed batch's events.
    _load(conn, 400, 9)
    processor = Processor(_FailsOnSecondBatch(), Partition(0, 1), batch_size=100)
    processor.start(conn)
    assert processor.run_batch(conn).more
    committed = processor.position
    with pytest.raises(ProjectionError):
        processor.run_batch(conn)
    stale = processor._read_ahead
    assert stale is not None and stale.after != committed
    assert processor.position == committed
    drain(conn, processor)
    assert verify_exactly_once(conn) == {"lost": 0, "duplicated": 0, "misordered": 0, "wrong_worker": 0}
    # The dropped read-ahead's rows are still counted: they were sent.
    assert processor.reader.rows_fetched == 400 + 100 + 100


def test_a_reconnect_drops_the_read_ahead(db_url: str) -> None:
    processor = Processor(Recorder(), Partition(0, 1), batch_size=100)
    with connect(db_url, autocommit=True) as first:
        _load(first, 250, 5)
        processor.start(first)
        assert processor.run_batch(first).more
        assert processor._read_ahead is not None
    with connect(db_url, autocommit=True) as second:
        processor.start(second)
        assert processor._read_ahead is None
        while processor.run_batch(second).visible:
            pass
        assert verify_exactly_once(second) == {"lost": 0, "duplicated": 0, "misordered": 0, "wrong_worker": 0}


def test_isolating_a_poison_event_reads_without_read_ahead(conn: Connection) -> None:
    # Isolation may stop before the batch's end, so a read-ahead from there would never be used.
    _load(conn, 250, 5)
    processor = Processor(Recorder(), Partition(0, 1), batch_size=100)
    processor.start(conn)
    assert processor.run_batch(conn, isolate=True).more
    assert processor._read_ahead is None
