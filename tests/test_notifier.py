"""The coalescing Notifier wakes workers for appends made with notify=False."""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import pytest

from projectionist.partitioning import Partition
from projectionist.records import NewEvent
from projectionist.settings import WorkerOptions
from projectionist.store.appending import append
from projectionist.store.connection import NOTIFY_CHANNEL, connect
from projectionist.store.notifier import Notifier
from projectionist.worker.worker import Worker
from tests.projections import Recorder, verify_exactly_once
from tests.test_worker import Collect

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
    hooks = Collect()
    worker = Worker(db_url, Recorder(), Partition(0, 1), WorkerOptions(poll_interval=30), hooks=hooks)
    with Notifier(db_url) as notifier, connect(db_url, autocommit=True) as conn:
        worker.start()
        try:
            deadline = time.monotonic() + 10
            while not hooks.states or hooks.states[-1].value != "live":
                assert time.monotonic() < deadline
                time.sleep(0.05)
            writers = [threading.Thread(target=_append_some, args=(db_url, notifier, k)) for k in range(4)]
            for t in writers:
                t.start()
            for t in writers:
                t.join()
            # The poll interval is 30 s: only the notifier can explain this.
            while conn.execute("SELECT count(*) FROM applied_events").fetchone() != (80,):
                assert time.monotonic() < deadline, "events not applied: notifier did not wake the worker"
                time.sleep(0.05)
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
    # it ended the thread for good, and workers woke only on polls after.
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
