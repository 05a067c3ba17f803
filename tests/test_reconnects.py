"""A worker outlives what goes wrong around it: a session the server ends mid-batch, reads that keep
failing, a checkpoint moved under it, a lock it waits for, a peer that vanishes; and which errors
count as a lost connection to reconnect from."""

from __future__ import annotations

import time
from collections.abc import Sequence

import psycopg
import pytest

from projectionist.consume.projection import Tx
from projectionist.hooks import WorkerHooks, WorkerInfo, WorkerState
from projectionist.partitioning import Partition
from projectionist.records import RecordedEvent
from projectionist.settings import WorkerOptions
from projectionist.store.connection import connect, connection_lost
from projectionist.testing import poll_until, wait_for
from projectionist.worker.worker import Worker
from tests.helpers import RecordingHooks, running
from tests.projections import Recorder, applied_count, load_sample

# -- a session ended by idle_in_transaction_session_timeout -----------------------------------


class SlowOnce(Recorder):
    """The first batch's client-side work (after its writes) outlasts the session's idle timeout."""

    name = "slow_once"

    def __init__(self) -> None:
        super().__init__()
        self.slow = True

    def apply_batch(self, events: Sequence[RecordedEvent], tx: Tx) -> None:
        super().apply_batch(events, tx)
        tx.execute("SELECT 1")
        if self.slow:
            self.slow = False
            time.sleep(0.8)


@pytest.mark.integration
def test_a_session_timed_out_mid_batch_reconnects_instead_of_killing_the_worker(db_url: str) -> None:
    # The server ends the session with SQLSTATE 25P03, which psycopg raises as an
    # InternalError, not an OperationalError: it is still a lost connection, to
    # reconnect from, not a reason for the worker to die.
    with connect(db_url, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{conn.info.dbname}" SET idle_in_transaction_session_timeout = 300')
        load_sample(conn, 20, 5)
        hooks = RecordingHooks()
        worker = Worker(db_url, SlowOnce(), Partition(0, 1), WorkerOptions(poll_interval=0.1), hooks=hooks)
        with running(worker):
            poll_until(lambda: applied_count(conn) == 20 or not worker.is_alive(), timeout=10)
            assert worker.is_alive(), f"worker died: {worker._error!r}"
            assert hooks.errors == ["database"]


@pytest.mark.parametrize(
    ("error", "lost"),
    [
        (psycopg.errors.AdminShutdown(), True),
        (psycopg.errors.IdleInTransactionSessionTimeout(), True),
        (psycopg.errors.ConnectionFailure(), True),
        (psycopg.errors.QueryCanceled(), False),  # statement_timeout: the statement's, same class 57
        (psycopg.errors.ProgramLimitExceeded(), False),
        (psycopg.errors.DeadlockDetected(), False),
        (ValueError("not a database error"), False),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_which_errors_count_as_a_lost_connection(error: BaseException, lost: bool) -> None:
    assert connection_lost(error, None) is lost


# -- a checkpoint moved under a live worker ---------------------------------------------------


@pytest.mark.integration
def test_a_fenced_worker_is_not_ready_until_it_has_rejoined(db_url: str) -> None:
    hooks = RecordingHooks()
    worker = Worker(db_url, Recorder(), Partition(0, 1), WorkerOptions(poll_interval=0.1), hooks=hooks)
    with connect(db_url, autocommit=True) as conn, running(worker):
        load_sample(conn, 20, 5)
        wait_for(
            lambda: applied_count(conn) == 20 and worker.state is WorkerState.LIVE, "the worker to go live"
        )
        conn.execute("UPDATE projection_checkpoints SET last_global_position = 0")  # moved under it
        wait_for(lambda: "fenced" in hooks.errors, "the worker to be fenced")
        wait_for(lambda: worker.state is WorkerState.LIVE, "the worker to rejoin")
    after = [state for state, _ in hooks.reasons[hooks.reasons.index((WorkerState.LIVE, "caught up")) :]]
    assert WorkerState.STARTING in after, hooks.reasons


# -- reads that keep failing ------------------------------------------------------------------


# The reconnect backoff is reset only once something worked, not as soon as the
# processor starts: a read that always fails (here, every read of events times
# out behind a lock) must back off further each time, not reconnect at the
# first step 4 times a second, dropping and retaking the partition's ownership.
@pytest.mark.integration
def test_a_failure_after_start_keeps_backing_off(db_url: str) -> None:
    with connect(db_url, autocommit=True) as conn:
        conn.execute(f"ALTER DATABASE {conn.info.dbname} SET lock_timeout = 100")
        load_sample(conn, 20, 2)
    worker = Worker(db_url, Recorder(), Partition(0, 1), WorkerOptions(poll_interval=0.2))
    worker.reconnect_backoff.initial = 0.05
    with connect(db_url) as holder:
        holder.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
        with running(worker):
            # 0.05, 0.1, 0.2, 0.4, 0.8 s: five attempts take about 1.5 s.
            wait_for(lambda: worker.reconnect_backoff.attempts >= 5, "five reconnect attempts", timeout=15)
        holder.rollback()
    assert worker.reconnect_backoff.attempts >= 5


# -- a lock it waits for ----------------------------------------------------------------------


# A rebuild holding the projection's setup lock (or another worker's setup
# waiting on DDL) must not leave a starting worker deaf to stop() and to
# SIGTERM, nor stop its loop from ticking, until the lock is released.
@pytest.mark.integration
def test_a_worker_waiting_for_the_setup_lock_still_stops(db_url: str) -> None:
    ticks: list[float] = []

    class Ticks(WorkerHooks):
        def on_tick(self, info: WorkerInfo) -> None:
            ticks.append(time.monotonic())

    worker = Worker(db_url, Recorder(), Partition(0, 1), WorkerOptions(poll_interval=0.2), hooks=Ticks())
    with connect(db_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(hashtext('projectionist.setup'), hashtext('recorder'))")
        worker.start()
        try:
            wait_for(lambda: len(ticks) >= 3, "the waiting worker's loop to tick", timeout=10)
            stopped_at = time.monotonic()
            worker.stop()
            worker.join(timeout=5)
            assert not worker.is_alive()
            assert time.monotonic() - stopped_at < 2
        finally:
            worker.stop()
            holder.execute("SELECT pg_advisory_unlock_all()")
            worker.join(timeout=10)


# -- a peer that vanishes ---------------------------------------------------------------------


# A worker must give up on a vanished peer within seconds, whether its
# connection is idle (keepalives) or sending (tcp_user_timeout), and so must
# the server: its session holds the partition's ownership lock.
@pytest.mark.integration
def test_connections_give_up_on_a_vanished_peer_within_seconds(db_url: str) -> None:
    with connect(db_url, autocommit=True) as conn:
        client = conn.info.get_parameters()
        assert (client["keepalives"], client["tcp_user_timeout"]) == ("1", "10000")
        if conn.info.host.startswith("/"):
            return  # a Unix socket has no TCP timeouts for the server to apply
        row = conn.execute("SHOW tcp_user_timeout").fetchone()
        assert row == ("10000",)
