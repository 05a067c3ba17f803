"""Notifications: the coalescing Notifier wakes workers for appends made with notify=False, and a
worker busy catching up does not hoard the notifications that arrive meanwhile."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import psycopg
import pytest

from projectionist.consume.projection import Tx
from projectionist.hooks import WorkerState
from projectionist.partitioning import Partition
from projectionist.records import NewEvent, RecordedEvent
from projectionist.settings import WorkerOptions
from projectionist.store.appending import append
from projectionist.store.connection import NOTIFY_CHANNEL, Connection, connect
from projectionist.store.notifier import Notifier
from projectionist.testing import wait_for
from projectionist.worker.worker import Worker
from tests.helpers import RecordingHooks, running
from tests.projections import Recorder, applied_count, load_sample, verify_exactly_once

pytestmark = pytest.mark.integration


def test_append_without_notify_sends_nothing_and_the_notifier_coalesces(db_url: str) -> None:
    with connect(db_url, autocommit=True) as listener, connect(db_url, autocommit=True) as conn:
        listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
        append(conn, "a", [NewEvent("E", {})], notify=False)
        assert list(listener.notifies(timeout=0.3)) == []
        append(conn, "a", [NewEvent("E", {})], notify=True)  # notifies, at commit
        assert len(list(listener.notifies(timeout=1, stop_after=1))) == 1

        with Notifier(db_url, min_interval=0.05) as notifier:
            for _ in range(200):
                notifier.poke()
            received = list(listener.notifies(timeout=1.0))
            # Two hundred pokes in a burst become a handful of notifications,
            # and at least one arrives after the last poke.
            assert 1 <= len(received) <= 5
            assert notifier.sent == len(received)


def test_a_poke_whose_notify_failed_is_sent_after_reconnecting(db_url: str) -> None:
    # The connection dies while idle (restart, failover, idle_session_timeout):
    # the next poke's NOTIFY fails, and must not be forgotten.
    with (
        connect(db_url, autocommit=True) as listener,
        connect(db_url, autocommit=True) as admin,
        Notifier(db_url, min_interval=0.01) as notifier,
    ):
        listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
        notifier.poke()
        assert len(list(listener.notifies(timeout=5, stop_after=1))) == 1
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'projectionist:notifier'"
        )
        time.sleep(0.2)
        notifier.poke()
        assert len(list(listener.notifies(timeout=5, stop_after=1))) == 1


def test_close_sends_a_poke_made_during_the_interval(db_url: str) -> None:
    with connect(db_url, autocommit=True) as listener:
        listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
        notifier = Notifier(db_url, min_interval=2.0)
        notifier.start()
        try:
            notifier.poke()
            assert len(list(listener.notifies(timeout=5, stop_after=1))) == 1
            notifier.poke()  # inside the 2 s interval: only close() can send it now
        finally:
            notifier.close()
        assert len(list(listener.notifies(timeout=2, stop_after=1))) == 1


@pytest.mark.parametrize("events", [1, 3], ids=["one-event statement", "one-stream statement"])
def test_each_single_stream_statement_notifies_only_when_asked(db_url: str, events: int) -> None:
    def batch() -> list[NewEvent]:
        return [NewEvent("E", {"i": i}) for i in range(events)]

    with connect(db_url, autocommit=True) as listener, connect(db_url, autocommit=True) as conn:
        listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
        first = append(conn, f"s{events}", batch(), notify=False)
        assert list(listener.notifies(timeout=0.3)) == []
        second = append(conn, f"s{events}", batch(), notify=True)
        assert len(list(listener.notifies(timeout=1, stop_after=1))) == 1
        assert (first.version, second.version) == (events, 2 * events)


def test_worker_wakes_promptly_from_the_notifier(db_url: str) -> None:
    hooks = RecordingHooks()
    worker = Worker(db_url, Recorder(), Partition(0, 1), WorkerOptions(poll_interval=30), hooks=hooks)
    with Notifier(db_url) as notifier, connect(db_url, autocommit=True) as conn:
        worker.start()
        try:
            wait_for(
                lambda: hooks.states and hooks.states[-1].value == "live", "the worker to go live", timeout=10
            )
            writers = [threading.Thread(target=_append_some, args=(db_url, notifier, k)) for k in range(4)]
            for t in writers:
                t.start()
            for t in writers:
                t.join()
            # The poll interval is 30 s: only the notifier can explain this.
            wait_for(
                lambda: conn.execute("SELECT count(*) FROM applied_events").fetchone() == (80,),
                "the events to be applied: the notifier to wake the worker",
                timeout=10,
            )
            assert "notify" in hooks.wakeups
            assert verify_exactly_once(conn)["lost"] == 0
        finally:
            worker.stop()
            worker.join(timeout=10)


def _append_some(db_url: str, notifier: Notifier, k: int) -> None:
    with connect(db_url, autocommit=True) as conn:
        for i in range(20):
            append(conn, f"agg-{k}", [NewEvent("E", {"i": i})], notify=False)
            notifier.poke()


def test_a_database_error_other_than_a_lost_connection_does_not_end_the_notifier(db_url: str) -> None:
    # NOTIFY on a server in recovery (after a failover) is an InternalError:
    # it must not end the thread for good, leaving workers to wake on polls only.
    calls = [0]

    def flaky_connect(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == 1:
            raise psycopg.errors.InternalError("cannot execute NOTIFY during recovery")
        return connect(*args, **kwargs)

    with (
        connect(db_url, autocommit=True) as listener,
        Notifier(db_url, min_interval=0.01, connect_fn=flaky_connect) as notifier,
    ):
        listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
        notifier.poke()
        assert len(list(listener.notifies(timeout=5, stop_after=1))) == 1
    assert calls[0] >= 2


def test_notifications_during_a_long_catch_up_are_not_queued(db_url: str) -> None:
    # psycopg keeps every NOTIFY that arrives during other statements until
    # notifies() runs, and a worker catching up never waits: unless the worker
    # drains it, the queue grows with every append for the whole catch-up.
    conns: list[Connection] = []

    def connect_recording(url: str, **kwargs: object) -> Connection:
        conn = connect(url, **kwargs)  # type: ignore[arg-type]
        conns.append(conn)
        return conn

    class Slow(Recorder):
        def apply_batch(self, events: Sequence[RecordedEvent], tx: Tx) -> None:
            super().apply_batch(events, tx)
            time.sleep(0.01)

    with connect(db_url, autocommit=True) as conn:
        load_sample(conn, 2000, 20)
        worker = Worker(
            db_url, Slow(), Partition(0, 1), WorkerOptions(batch_size=10), connect_fn=connect_recording
        )
        with running(worker):
            wait_for(lambda: applied_count(conn) > 0, "the first batch")
            for _ in range(300):
                conn.execute(f"NOTIFY {NOTIFY_CHANNEL}")
            assert worker.state is WorkerState.CATCHING_UP  # still busy: it never waited
            time.sleep(0.2)  # the worker's next statements read the notifications
            assert worker.state is WorkerState.CATCHING_UP
            (worker_conn,) = conns
            # psycopg's own queue (no public accessor): what must not grow.
            assert len(worker_conn._notifies_backlog or ()) == 0
