"""Wake-ups: appends NOTIFY only while a worker sleeps, and no reader depends on a wake-up to catch up."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest
from prometheus_client import CollectorRegistry

from projectionist.hooks import WorkerInfo
from projectionist.partitioning import Partition
from projectionist.records import NewEvent, Position
from projectionist.settings import WorkerOptions
from projectionist.store import doorbell
from projectionist.store.appending import StreamAppend, append, append_async, append_many
from projectionist.store.connection import NOTIFY_CHANNEL, Connection, connect
from projectionist.telemetry.metrics import MetricsHooks
from projectionist.testing import wait_for
from projectionist.worker.elastic import ElasticWorker
from projectionist.worker.worker import Worker
from tests.helpers import RecordingHooks, running
from tests.projections import Recorder, applied_count, verify_exactly_once

pytestmark = pytest.mark.integration

EXACTLY_ONCE = {"lost": 0, "duplicated": 0, "misordered": 0, "wrong_worker": 0}


@contextmanager
def _listening(db_url: str) -> Iterator[Connection]:
    with connect(db_url, autocommit=True) as listener:
        listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
        yield listener


def _received(listener: Connection, wait: float = 0.3) -> int:
    return len(list(listener.notifies(timeout=wait)))


# -- the append side ---------------------------------------------------------------------------


def test_appends_notify_only_while_a_worker_sleeps(db_url: str) -> None:
    def every_kind_of_append(conn: Connection, k: int) -> None:
        append(conn, f"one-{k}", [NewEvent("E", {})])  # the one-event statement
        append(conn, f"few-{k}", [NewEvent("E", {}), NewEvent("E", {})])  # one stream, several events
        append_many(
            conn, [StreamAppend(f"m-{k}", [NewEvent("E", {})]), StreamAppend(f"n-{k}", [NewEvent("E", {})])]
        )
        with connect(db_url) as caller:  # the caller's own transaction: the locked path
            append(caller, f"tx-{k}", [NewEvent("E", {})])
            caller.commit()

        async def on_asyncio() -> None:
            async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as aconn:
                await append_async(aconn, f"async-{k}", [NewEvent("E", {})])

        asyncio.run(on_asyncio())

    with _listening(db_url) as listener, connect(db_url, autocommit=True) as conn:
        every_kind_of_append(conn, 1)
        assert _received(listener) == 0  # nobody sleeps: not one NOTIFY

        with connect(db_url, autocommit=True) as sleeper:
            assert doorbell.try_to_sleep(sleeper) is doorbell.Turn.HOLDER
            assert doorbell.sleeping(conn)
            every_kind_of_append(conn, 2)
            # One NOTIFY per append transaction, each delivered at its commit.
            assert _received(listener, wait=1.0) == 5
            doorbell.leave(sleeper, ring=False)

        every_kind_of_append(conn, 3)
        assert _received(listener) == 0
        assert conn.execute("SELECT count(*) FROM events").fetchone() == (3 * 7,)


def test_notify_false_never_notifies_and_notify_true_always_does(db_url: str) -> None:
    with _listening(db_url) as listener, connect(db_url, autocommit=True) as conn:
        with connect(db_url, autocommit=True) as sleeper:
            doorbell.try_to_sleep(sleeper)
            append(conn, "quiet", [NewEvent("E", {})], notify=False)
            assert _received(listener) == 0
        append(conn, "loud", [NewEvent("E", {})], notify=True)
        assert _received(listener, wait=1.0) == 1


def test_an_uncommitted_append_keeps_a_worker_from_falling_asleep(db_url: str) -> None:
    # The property that makes the doorbell race-free: while an append that
    # found nobody asleep is uncommitted, no worker can take the doorbell, so
    # a worker that does take it and reads once more sees every such append.
    with (
        connect(db_url) as caller,
        connect(db_url, autocommit=True) as worker,
        connect(db_url, autocommit=True) as other,
    ):
        append(caller, "a", [NewEvent("E", {})])  # inside the caller's transaction, uncommitted
        assert doorbell.try_to_sleep(worker) is doorbell.Turn.APPENDING
        caller.commit()
        assert doorbell.try_to_sleep(worker) is doorbell.Turn.HOLDER
        assert doorbell.try_to_sleep(other) is doorbell.Turn.ANOTHER_SLEEPER
        doorbell.leave(worker, ring=False)
        assert not doorbell.sleeping(other)


# -- the worker side ---------------------------------------------------------------------------


def test_a_reader_catches_up_with_wake_ups_disabled_entirely(db_url: str) -> None:
    # No NOTIFY from any append and no Notifier: the worker must still apply
    # every event exactly once, events hidden behind an open transaction
    # included, by polling alone. Wake-ups are for latency only.
    hooks = RecordingHooks()
    options = WorkerOptions(poll_interval=0.2, batch_size=50)
    worker = Worker(db_url, Recorder(), Partition(0, 1), options, hooks=hooks)

    def write(k: int) -> None:
        with connect(db_url, autocommit=True) as conn:
            for i in range(60):
                append(conn, f"agg-{k}-{i % 7}", [NewEvent("E", {"i": i})], notify=False)

    with _listening(db_url) as listener, connect(db_url, autocommit=True) as conn, running(worker):
        wait_for(lambda: doorbell.sleeping(conn), "the worker to fall asleep")
        with connect(db_url) as blocker:
            blocker.execute("SELECT pg_current_xact_id()")  # an older transaction holds the read fence
            writers = [threading.Thread(target=write, args=(k,)) for k in range(4)]
            for t in writers:
                t.start()
            for t in writers:
                t.join()
            with connect(db_url) as caller:  # and appends in a caller's transaction
                append_many(
                    caller, [StreamAppend(f"tx-{i}", [NewEvent("E", {})]) for i in range(10)], notify=False
                )
                caller.commit()
            time.sleep(0.5)
            assert applied_count(conn) == 0  # all of it behind the fence
        wait_for(lambda: applied_count(conn) == 250, "every event to be applied", timeout=30)
        assert verify_exactly_once(conn) == EXACTLY_ONCE
        # The only NOTIFY is the worker's own, as it leaves the doorbell for
        # the sleepers that might rely on it; it does not wake itself.
        own = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'projectionist:recorder:%'"
        ).fetchall()
        assert {n.pid for n in listener.notifies(timeout=0)} <= {pid for (pid,) in own}
    assert "notify" not in hooks.wakeups
    assert "poll" in hooks.wakeups


def test_a_busy_worker_costs_appends_no_notify(db_url: str) -> None:
    # A steady stream of appends keeps the worker busy: it polls, so the
    # appends find the doorbell free and send no NOTIFY, after at most the
    # first few that woke it.
    hooks = RecordingHooks()
    worker = Worker(db_url, Recorder(), Partition(0, 1), WorkerOptions(poll_interval=30), hooks=hooks)
    with _listening(db_url) as listener, connect(db_url, autocommit=True) as conn, running(worker):
        wait_for(lambda: doorbell.sleeping(conn), "the worker to fall asleep")
        for i in range(80):
            append(conn, f"steady-{i % 10}", [NewEvent("E", {"i": i})])
            time.sleep(0.01)
        wait_for(lambda: applied_count(conn) == 80, "every event to be applied", timeout=10)
        notified = _received(listener, wait=0.1)
        assert 1 <= notified <= 20, f"{notified} of 80 appends sent a NOTIFY"
        assert verify_exactly_once(conn) == EXACTLY_ONCE
        # Idle again: back to sleep behind the doorbell, so the next append rings.
        wait_for(lambda: doorbell.sleeping(conn), "the worker to fall asleep again")
        append(conn, "after", [NewEvent("E", {})])
        wait_for(lambda: applied_count(conn) == 81, "the next event to be applied", timeout=10)
    assert "busy_poll" in hooks.wakeups
    assert "notify" in hooks.wakeups
    assert "poll" not in hooks.wakeups  # the poll interval is 30 s: never reached


def test_a_sleeper_without_the_doorbell_is_woken_when_its_holder_stops(db_url: str) -> None:
    # Two idle workers: one holds the doorbell, the other sleeps relying on it.
    # When the holder stops, it rings, so the other takes the doorbell over
    # and the next append still wakes it at once (the poll interval is 30 s).
    options = WorkerOptions(poll_interval=30)
    first = Worker(db_url, Recorder("first"), Partition(0, 1), options)
    second_hooks = RecordingHooks()
    second = Worker(db_url, Recorder("second"), Partition(0, 1), options, hooks=second_hooks)
    with connect(db_url, autocommit=True) as conn:
        with running(first):
            wait_for(lambda: first._holds_doorbell, "the first worker to take the doorbell")
            second.start()
            wait_for(lambda: second._doorbell_armed, "the second worker to fall asleep")
            assert not second._holds_doorbell
        try:
            wait_for(
                lambda: second._holds_doorbell, "the second worker to take the doorbell over", timeout=10
            )
            started = time.monotonic()
            append(conn, "x", [NewEvent("E", {})])
            wait_for(
                lambda: (
                    conn.execute("SELECT count(*) FROM applied_events WHERE projection = 'second'").fetchone()
                    == (1,)
                ),
                "the event to be applied",
                timeout=10,
            )
            assert time.monotonic() - started < 5
        finally:
            second.stop()
            second.join(timeout=10)
    # The first worker's ring as it left (a relay), then the append's NOTIFY.
    assert "relay" in second_hooks.wakeups
    assert "notify" in second_hooks.wakeups
    assert "poll" not in second_hooks.wakeups


def test_wakeup_sources_start_at_zero() -> None:
    registry = CollectorRegistry()
    hooks = MetricsHooks(registry, version="0")
    hooks.register_worker(WorkerInfo("p", 0, 1))
    for source in ("notify", "relay", "poll", "busy_poll"):
        value = registry.get_sample_value(
            "projectionist_wakeups_total",
            {"projection": "p", "worker": "0", "total_workers": "1", "source": source},
        )
        assert value == 0


# -- elastic members wait the same way ---------------------------------------------------------


def test_an_idle_elastic_member_sleeps_behind_the_doorbell_and_an_append_wakes_it(db_url: str) -> None:
    # The poll interval is 30 s: only the append's NOTIFY, sent because the
    # member sleeps behind the doorbell, can explain a prompt application.
    hooks = RecordingHooks()
    options = WorkerOptions(poll_interval=30, rebalance_interval=0.2)
    member = ElasticWorker(db_url, Recorder, options, partitions=4, name="m0", hooks=hooks)
    with connect(db_url, autocommit=True) as conn, running(member):
        wait_for(lambda: len(member.owned) == 4, "the member to own every partition", timeout=20)
        wait_for(lambda: doorbell.sleeping(conn), "the member to fall asleep", timeout=20)
        started = time.monotonic()
        append(conn, "x", [NewEvent("E", {})])
        wait_for(lambda: applied_count(conn) == 1, "the event to be applied", timeout=10)
        assert time.monotonic() - started < 5
    assert "notify" in hooks.wakeups


def test_busy_elastic_members_cost_appends_no_notify_and_apply_everything(db_url: str) -> None:
    options = WorkerOptions(poll_interval=30, rebalance_interval=0.2)
    hooks = [RecordingHooks(), RecordingHooks()]
    members = [
        ElasticWorker(db_url, Recorder, options, partitions=4, name=f"m{i}", hooks=h)
        for i, h in enumerate(hooks)
    ]
    with _listening(db_url) as listener, connect(db_url, autocommit=True) as conn:
        with running(members[0]), running(members[1]):
            wait_for(
                lambda: sorted(len(m.owned) for m in members) == [2, 2],
                "the members to share the partitions",
                timeout=20,
            )
            append(conn, "warm-up", [NewEvent("E", {})])  # wakes them: busy from here on
            wait_for(lambda: applied_count(conn) == 1, "the first event to be applied", timeout=10)
            _received(listener, wait=0.1)
            for i in range(300):
                append(conn, f"agg-{i % 17}", [NewEvent("E", {"i": i})])
                time.sleep(0.002)
            notified = _received(listener, wait=0.1)
            wait_for(lambda: applied_count(conn) == 301, "every event to be applied", timeout=20)
        assert verify_exactly_once(conn, "recorder") == EXACTLY_ONCE
    # Events 2 ms apart keep the members busy: they poll, and appends do not notify.
    assert notified <= 3
    assert any("busy_poll" in h.wakeups for h in hooks)


def test_a_look_reads_the_index_not_the_table(db_url: str) -> None:
    # A look runs every few milliseconds while a group is busy: a plan that
    # scans the table would cost more the larger the store grows.
    with connect(db_url, autocommit=True) as conn:
        # Without statistics yet, as in a store just loaded: the planner's guess decides.
        conn.execute("ALTER TABLE events SET (autovacuum_enabled = false)")
        appends = [StreamAppend(f"agg-{i}", [NewEvent("E", {}) for _ in range(10)]) for i in range(500)]
        append_many(conn, appends, notify=False)
        row = conn.execute(
            "SELECT transaction_id::text, global_position FROM events ORDER BY 2 DESC LIMIT 1"
        ).fetchone()
        assert row is not None
        params = {"txid": row[0], "pos": row[1]}
        plan = "\n".join(r[0] for r in conn.execute(psycopg.sql.SQL("EXPLAIN ") + doorbell._LOOK, params))
        assert "Seq Scan" not in plan, plan
        assert plan.count("events_transaction_position_idx") == 2, plan
        assert doorbell.look(conn, Position(int(row[0]), row[1])) == doorbell.Look(
            visible=False, hidden=False
        )
