"""No event is skipped when concurrent appends commit out of position order."""

from __future__ import annotations

import random
import threading
import time

import pytest

from projectionist.consume.reader import PartitionReader
from projectionist.errors import ConcurrencyError
from projectionist.partitioning import Partition
from projectionist.records import NewEvent, Position
from projectionist.settings import WorkerOptions
from projectionist.store.appending import append
from projectionist.store.connection import Connection, connect
from projectionist.testing import poll_until, wait_until_readable
from projectionist.worker.worker import Worker
from tests.projections import Recorder, applied_count, verify_exactly_once

pytestmark = pytest.mark.integration


def _naive_read(conn: Connection, after: int) -> list[int]:
    # The upstream library's read: position order, no fence.
    return [
        r[0]
        for r in conn.execute(
            "SELECT global_position FROM events WHERE global_position > %s ORDER BY 1", (after,)
        )
    ]


def test_out_of_order_commit_is_held_back_not_skipped(db_url: str) -> None:
    reader = PartitionReader(Partition(0, 1), batch_size=100)
    with (
        connect(db_url) as slow,
        connect(db_url, autocommit=True) as fast,
        connect(db_url, autocommit=True) as worker,
    ):
        slow_result = append(slow, "a", [NewEvent("E", {})])  # position 1, not committed
        fast_result = append(fast, "b", [NewEvent("E", {})])  # position 2, committed
        assert slow_result.global_positions[0] < fast_result.global_positions[0]

        # The naive reader sees position 2 and would checkpoint past 1.
        assert _naive_read(worker, 0) == [fast_result.global_positions[0]]

        # The gap-safe reader sees nothing yet: the open transaction fences it.
        with worker.transaction():
            assert reader.read(worker, Position()).events == []

        slow.commit()
        assert _naive_read(worker, fast_result.global_positions[0]) == []  # the naive reader lost it
        wait_until_readable(worker)
        with worker.transaction():
            batch = reader.read(worker, Position())
        assert [e.aggregate_id for e in batch.events] == ["a", "b"]


def test_concurrent_appenders_with_delays_lose_and_duplicate_nothing(db_url: str) -> None:
    appenders, appends_each, total_workers = 8, 40, 4
    stop_workers = threading.Event()
    errors: list[BaseException] = []
    workers = [
        Worker(
            db_url, Recorder(), Partition(k, total_workers), WorkerOptions(batch_size=50, poll_interval=0.2)
        )
        for k in range(total_workers)
    ]
    for w in workers:
        w.start()

    def appender(seed: int) -> None:
        rng = random.Random(seed)
        try:
            with connect(db_url) as c:
                for i in range(appends_each):
                    # Random delays inside the transaction, between taking the
                    # position (INSERT) and committing, make commits land out of
                    # position order all the time.
                    time.sleep(rng.uniform(0, 0.005))
                    agg = f"agg-{rng.randrange(30)}"
                    events = [NewEvent("E", {"i": i, "j": j}) for j in range(rng.randint(1, 3))]
                    if rng.random() < 0.3:
                        # Take the transaction id first, as a caller that wrote
                        # something else before appending would: positions
                        # taken meanwhile by younger transactions then sort
                        # before ours, so ids and positions surely disagree.
                        c.execute("SELECT pg_current_xact_id()")
                        time.sleep(rng.uniform(0, 0.005))
                    try:
                        append(c, agg, events)
                    except ConcurrencyError:
                        # The ordering guard: the stream's last append
                        # committed after our id was taken. Retry afresh.
                        c.rollback()
                        append(c, agg, events)
                    time.sleep(rng.uniform(0, 0.02))
                    c.commit()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=appender, args=(s,)) for s in range(appenders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []

    with connect(db_url, autocommit=True) as conn:
        total = conn.execute("SELECT count(*) FROM events").fetchone()
        assert total is not None and total[0] > appenders * appends_each
        # Prove the scenario really had out-of-order commits: a commit-order
        # inversion exists when a higher position has a lower transaction id.
        inversions = conn.execute(
            "SELECT count(*) FROM events a JOIN events b"
            " ON a.global_position < b.global_position AND a.transaction_id > b.transaction_id"
        ).fetchone()
        assert inversions is not None and inversions[0] > 0

        # No assertion on timeout: the check below names what was lost.
        poll_until(lambda: applied_count(conn) >= total[0], timeout=60, interval=0.1)
        time.sleep(0.5)  # let a duplicate, if any, land too
        for w in workers:
            w.stop()
        for w in workers:
            w.join(timeout=10)
        result = verify_exactly_once(conn)
    assert result == {"lost": 0, "duplicated": 0, "misordered": 0, "wrong_worker": 0}
    del stop_workers
