"""Worker behaviour: server-side partition filtering, NOTIFY wake-ups, reconnects, standby."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta

import pytest

from projectionist.consume.processor import Processor
from projectionist.consume.projection import Tx
from projectionist.consume.reader import PartitionReader, RetiredGroupMarks, build_read_query
from projectionist.hooks import WorkerState
from projectionist.partitioning import Partition, partition_of
from projectionist.records import NewEvent, Position, RecordedEvent
from projectionist.settings import WorkerOptions
from projectionist.store import doorbell
from projectionist.store.appending import append
from projectionist.store.connection import Connection, connect
from projectionist.testing import wait_for, wait_until_readable
from projectionist.worker.worker import Worker
from tests.helpers import RecordingHooks
from tests.projections import Recorder, applied_count, drain, load_sample, verify_exactly_once

pytestmark = pytest.mark.integration


def test_each_worker_fetches_only_its_own_partition(conn: Connection) -> None:
    load_sample(conn, 4000, 97)
    per_partition = [0, 0, 0, 0]
    for agg, n in conn.execute("SELECT aggregate_id, count(*) FROM events GROUP BY 1"):
        per_partition[partition_of(agg, 4)] += n
    for k in range(4):
        processor = Processor(Recorder(), Partition(k, 4), batch_size=100)
        processor.start(conn)
        drain(conn, processor)
        # Rows that crossed the wire are exactly this partition's events: no
        # read amplification, unlike the upstream design where every worker
        # reads every event and filters on the client.
        assert processor.reader.rows_fetched == per_partition[k]
    assert verify_exactly_once(conn) == {"lost": 0, "duplicated": 0, "misordered": 0, "wrong_worker": 0}
    print("rows fetched per worker:", per_partition, "of", sum(per_partition))


def test_idle_partitions_checkpoints_move_to_the_newest_visible_row(conn: Connection) -> None:
    load_sample(conn, 2000, 40)
    processors = [Processor(Recorder(), Partition(k, 4), batch_size=100) for k in range(4)]
    for processor in processors:
        processor.start(conn)
        drain(conn, processor)
    # New events for partition 0 only: the others have nothing to apply, yet
    # their checkpoints still reach the head, so their lag reads zero and
    # their next read starts after the rows they skipped.
    hot = next(f"hot-{i}" for i in range(100) if partition_of(f"hot-{i}", 4) == 0)
    for i in range(30):
        append(conn, hot, [NewEvent("E", {"i": i})])
    head = conn.execute("SELECT max(global_position) FROM events").fetchone()
    assert head is not None
    fetched_before = [p.reader.rows_fetched for p in processors]
    for processor in processors:
        drain(conn, processor)
        assert processor.position is not None and processor.position.global_position == head[0]
    assert [p.reader.rows_fetched - before for p, before in zip(processors, fetched_before, strict=True)] == [
        30,
        0,
        0,
        0,
    ]
    assert verify_exactly_once(conn) == {"lost": 0, "duplicated": 0, "misordered": 0, "wrong_worker": 0}


class _DayBook(Recorder):
    """Notes the session's time zone and the calendar day SQL gives each event."""

    def __init__(self) -> None:
        super().__init__("day_book")
        self.seen: list[tuple[str, str, RecordedEvent]] = []
        self.synchronous_commit = ""

    def apply_batch(self, events: Sequence[RecordedEvent], tx: Tx) -> None:
        for e in events:
            zone, day, self.synchronous_commit = tx.execute(
                "SELECT current_setting('TimeZone'), (%s::timestamptz)::date::text,"
                " current_setting('synchronous_commit')",
                (e.created_at,),
            ).fetchone()
            self.seen.append((zone, day, e))


def test_projections_see_utc_whatever_the_servers_time_zone(conn: Connection) -> None:
    # 23:30 UTC is already the next day in Tokyo: a read model cut by day must
    # not depend on which server (or session default) it was rebuilt on.
    conn.execute(f"ALTER DATABASE {conn.info.dbname} SET TimeZone = 'Asia/Tokyo'")
    append(conn, "tz-1", [NewEvent("E", {})])
    conn.execute("UPDATE events SET created_at = '2026-03-01 23:30:00+00'")
    wait_until_readable(conn)
    with connect(conn.info.dsn, autocommit=True) as worker_conn:
        assert worker_conn.execute("SHOW TimeZone").fetchone() == ("Asia/Tokyo",)
        projection = _DayBook()
        processor = Processor(projection, Partition(0, 1), batch_size=10)
        processor.start(worker_conn)
        processor.run_batch(worker_conn)
    ((zone, day, event),) = projection.seen
    assert (zone, day) == ("UTC", "2026-03-01")
    assert event.created_at == datetime(2026, 3, 1, 23, 30, tzinfo=UTC)
    assert event.created_at.utcoffset() == timedelta(0)
    # The other session setting a worker makes: batches do not wait for their WAL flush.
    assert projection.synchronous_commit == "off"


@pytest.mark.parametrize("partition", [Partition(1, 4), Partition(0, 1)], ids=str)
@pytest.mark.parametrize("marks", [False, True], ids=["no-marks", "skip-marks"])
def test_read_query_plan_is_an_ordered_index_scan(
    conn: Connection, partition: Partition, marks: bool
) -> None:
    load_sample(conn, 20000, 50)
    conn.execute("ANALYZE events")
    rows = conn.execute(
        "SELECT transaction_id, global_position FROM events"
        " ORDER BY transaction_id, global_position OFFSET 10000 LIMIT 3"
    ).fetchall()
    layers = (RetiredGroupMarks(3, tuple(Position(int(tx), pos) for tx, pos in rows)),) if marks else ()
    query = build_read_query(partition, layers).as_string(conn)
    middle = rows[0]
    # Both the custom plan and the generic plan psycopg gets after 5 runs,
    # from the start and from the middle of the table.
    for mode in ("force_custom_plan", "force_generic_plan"):
        conn.execute(f"SET plan_cache_mode = {mode}")
        for txid, pos in (("0", 0), (str(middle[0]), middle[1])):
            params = {"txid": txid, "pos": pos, "limit": 500}
            plan = _plan(conn, query, params)
            assert "Index Scan using events_transaction_position_idx" in plan, plan
            assert "Seq Scan" not in plan and "Sort" not in plan, plan


def test_a_plain_partition_filter_would_tip_the_plan_into_a_sort(conn: Connection) -> None:
    # The control for the test above: the same read with the filter written
    # plainly, as the CASE in reader.py avoids, gets the planner's 0.5% guess
    # and a sort of everything after the checkpoint for every batch.
    load_sample(conn, 20000, 50)
    conn.execute("ANALYZE events")
    query = build_read_query(Partition(1, 4)).as_string(conn)
    plain = query.replace("CASE WHEN (", "(").replace(") THEN true ELSE false END", ")")
    assert plain != query
    plan = _plan(conn, plain, {"txid": "0", "pos": 0, "limit": 500})
    assert "Sort" in plan, plan


def _plan(conn: Connection, query: str, params: dict[str, object]) -> str:
    return "\n".join(r[0] for r in conn.execute("EXPLAIN " + query, params))


def test_quick_looks_behind_the_read_fence_are_not_poll_wakeups(db_url: str) -> None:
    # An older open transaction hides a fresh append from the gap-safe read:
    # the worker looks again every few ms. Those looks are not the poll timer
    # (30 s here), and counted as polls they would read as NOTIFY not arriving.
    hooks = RecordingHooks()
    worker = Worker(db_url, Recorder(), Partition(0, 1), WorkerOptions(poll_interval=30), hooks=hooks)
    worker.start()
    try:
        with connect(db_url, autocommit=True) as conn, connect(db_url) as blocker:
            wait_for(
                lambda: doorbell.sleeping(conn), "the worker to fall asleep", timeout=20
            )  # the append will NOTIFY
            blocker.execute("SELECT pg_current_xact_id()")  # an older transaction, left open
            append(conn, "x", [NewEvent("E", {})])
            time.sleep(0.8)  # the fenced looks back off from 5 ms: about seven in this time
            assert _count(conn, "SELECT count(*) FROM applied_events") == 0
            blocker.rollback()
            wait_for(lambda: applied_count(conn) == 1, "the event to be applied", timeout=10)
        assert "notify" in hooks.wakeups
        assert "poll" not in hooks.wakeups
    finally:
        worker.stop()
        worker.join(timeout=10)


def test_notify_wakes_an_idle_worker_long_before_the_poll_interval(db_url: str) -> None:
    hooks = RecordingHooks()
    worker = Worker(db_url, Recorder(), Partition(0, 1), WorkerOptions(poll_interval=30), hooks=hooks)
    worker.start()
    try:
        with connect(db_url, autocommit=True) as conn:
            wait_for(
                lambda: doorbell.sleeping(conn), "the worker to fall asleep", timeout=20
            )  # the append will NOTIFY
            append(conn, "x", [NewEvent("E", {})])
            # The poll interval is 30 s, so only the NOTIFY can explain an
            # application within the wait below.
            wait_for(lambda: applied_count(conn) == 1, "the event to be applied", timeout=10)
        assert "notify" in hooks.wakeups
        assert "poll" not in hooks.wakeups
    finally:
        worker.stop()
        worker.join(timeout=10)


def test_worker_reconnects_after_its_connection_is_killed(db_url: str) -> None:
    hooks = RecordingHooks()
    worker = Worker(db_url, Recorder(), Partition(0, 1), WorkerOptions(poll_interval=0.2), hooks=hooks)
    worker.start()
    try:
        with connect(db_url, autocommit=True) as conn:
            load_sample(conn, 100, 5)
            wait_for(lambda: applied_count(conn) == 100, "100 events applied", timeout=20)
            killed = conn.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE application_name LIKE 'projectionist:recorder:%'"
            ).fetchone()
            assert killed == (1,)
            load_sample(conn, 100, 5)
            wait_for(lambda: applied_count(conn) == 200, "200 events applied", timeout=30)
            assert verify_exactly_once(conn)["duplicated"] == 0
        assert "database" in hooks.errors
    finally:
        worker.stop()
        worker.join(timeout=10)


def test_second_process_for_a_partition_waits_as_standby_and_takes_over(db_url: str) -> None:
    owner_hooks, standby_hooks = RecordingHooks(), RecordingHooks()
    owner = Worker(db_url, Recorder(), Partition(0, 1), WorkerOptions(poll_interval=0.2), hooks=owner_hooks)
    standby = Worker(
        db_url, Recorder(), Partition(0, 1), WorkerOptions(poll_interval=0.2), hooks=standby_hooks
    )
    owner.start()
    wait_for(lambda: WorkerState.LIVE in owner_hooks.states, "the owner to go live", timeout=20)
    standby.start()
    try:
        wait_for(lambda: WorkerState.STANDBY in standby_hooks.states, "the second to stand by", timeout=20)
        with connect(db_url, autocommit=True) as conn:
            load_sample(conn, 50, 5)
            wait_for(lambda: applied_count(conn) == 50, "50 events applied", timeout=20)
            owner.stop()
            owner.join(timeout=10)
            wait_for(lambda: WorkerState.LIVE in standby_hooks.states, "the standby to take over", timeout=10)
            load_sample(conn, 50, 5)
            wait_for(lambda: applied_count(conn) == 100, "100 events applied", timeout=20)
            assert verify_exactly_once(conn)["duplicated"] == 0
    finally:
        owner.stop()
        standby.stop()
        standby.join(timeout=10)


def test_failing_projection_is_retried_and_never_skipped(db_url: str) -> None:
    class FailsOnce(Recorder):
        def __init__(self) -> None:
            super().__init__()
            self.failures = 0

        def apply_batch(self, events: object, tx: object) -> None:  # type: ignore[override]
            if self.failures < 2:
                self.failures += 1
                raise RuntimeError("boom")
            super().apply_batch(events, tx)  # type: ignore[arg-type]

    hooks = RecordingHooks()
    worker = Worker(db_url, FailsOnce(), Partition(0, 1), WorkerOptions(poll_interval=0.2), hooks=hooks)
    worker.retry_backoff.initial = 0.05
    with connect(db_url, autocommit=True) as conn:
        load_sample(conn, 30, 3)
        worker.start()
        try:
            wait_for(lambda: applied_count(conn) == 30, "30 events applied", timeout=20)
        finally:
            worker.stop()
            worker.join(timeout=10)
        assert hooks.errors.count("projection") == 2
        assert WorkerState.FAILING in hooks.states
        assert verify_exactly_once(conn) == {"lost": 0, "duplicated": 0, "misordered": 0, "wrong_worker": 0}


def test_checkpoint_compare_and_set_fences_a_second_owner(conn: Connection) -> None:
    load_sample(conn, 20, 2)
    a = Processor(Recorder(), Partition(0, 1), batch_size=10)
    b = Processor(Recorder(), Partition(0, 1), batch_size=10)
    a.start(conn)
    b.start(conn)
    a.run_batch(conn)
    from projectionist.errors import FencedError

    with pytest.raises(FencedError):
        b.run_batch(conn)  # b still believes the checkpoint is at the start
    assert _count(conn, "SELECT count(*) FROM applied_events") == 10  # b's writes rolled back
    assert b.position == Position()


def _count(conn: Connection, query: str) -> int:
    row = conn.execute(query).fetchone()
    return int(row[0]) if row else 0


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    leaked = [t for t in threading.enumerate() if t not in before and t.name.startswith("worker-")]
    for t in leaked:
        t.join(timeout=10)


def test_transaction_ids_arrive_as_the_exact_integers(db_url: str) -> None:
    # The reader fetches xid8 in binary on a connection that had no loader
    # for it; the ids must equal the server's own text form.
    with connect(db_url, autocommit=True) as conn:
        append(conn, "tx-1", [NewEvent("E", {}), NewEvent("E", {})])
        append(conn, "tx-2", [NewEvent("E", {})])
        # Ordered by the column, not the text (where '1000' < '999').
        expected = [
            int(r[0])
            for r in conn.execute(
                "SELECT transaction_id::text AS txid FROM events ORDER BY transaction_id, global_position"
            )
        ]
    with connect(db_url, autocommit=True) as fresh:
        wait_until_readable(fresh)
        batch = PartitionReader(Partition(0, 1), 10).read(fresh, Position())
        marked = PartitionReader(Partition(1, 2), 10).read(fresh, Position())
    assert [e.transaction_id for e in batch.events] == expected
    assert all(type(e.transaction_id) is int for e in batch.events)
    assert marked.end is not None and marked.end.transaction_id == expected[-1]
