"""How a worker survives what goes wrong around it: an idle fence, a projection's own database
error, a session timed out mid-batch, a broken hook, an index built while it idles."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Sequence

import psycopg
import pytest

from projectionist.backoff import Backoff
from projectionist.consume import dead_letters
from projectionist.consume import processor as processor_module
from projectionist.consume.partition_indexes import create_indexes
from projectionist.consume.processor import Processor
from projectionist.consume.projection import Tx
from projectionist.hooks import WorkerHooks, WorkerInfo, WorkerState
from projectionist.partitioning import Partition
from projectionist.records import NewEvent, RecordedEvent
from projectionist.settings import PoisonPolicy, WorkerOptions
from projectionist.store.appending import append
from projectionist.store.connection import NOTIFY_CHANNEL, Connection, connect, connection_lost
from projectionist.telemetry.health import HealthHooks
from projectionist.worker.supervisor import Supervisor
from projectionist.worker.worker import Worker
from tests.helpers import run_cli
from tests.projections import Recorder, applied_count, load_sample

pytestmark = pytest.mark.integration


class Collect(WorkerHooks):
    def __init__(self) -> None:
        self.states: list[tuple[WorkerState, str]] = []
        self.errors: list[tuple[str, BaseException]] = []

    def on_state(self, info: WorkerInfo, state: WorkerState, reason: str) -> None:
        self.states.append((state, reason))

    def on_error(self, info: WorkerInfo, error_type: str, error: BaseException) -> None:
        self.errors.append((error_type, error))


def _wait(predicate: object, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


@contextlib.contextmanager
def _running(worker: Worker) -> Iterator[Worker]:
    worker.start()
    try:
        yield worker
    finally:
        worker.stop()
        with contextlib.suppress(BaseException):
            worker.join(timeout=15)


# -- an idle worker is fenced too --------------------------------------------------------------


def test_rebuild_force_with_an_idle_live_worker_rebuilds_the_read_model(db_url: str) -> None:
    # rebuild --force counts on live workers being fenced, but an idle one commits
    # nothing: it must still notice that its checkpoint moved, or it keeps reading
    # from its old position and the emptied read model stays empty.
    worker = Worker(db_url, Recorder(), Partition(0, 1), WorkerOptions(poll_interval=0.1))
    with connect(db_url, autocommit=True) as conn, _running(worker):
        load_sample(conn, 300, 10)
        assert _wait(lambda: applied_count(conn) == 300 and worker.state is WorkerState.LIVE)
        result = run_cli(
            "rebuild",
            "--projection",
            "tests.projections:Recorder",
            "--force",
            "--timeout",
            "8",
            db_url=db_url,
        )
        assert result.returncode == 0, result.stderr.strip().splitlines()[-1]
        assert applied_count(conn) == 300


# -- a database error the projection causes is the projection's, not an outage ----------------


class IndexedTitles(Recorder):
    """A read model with a btree-indexed column: a too-large value fails with SQLSTATE 54000."""

    name = "indexed_titles"

    def setup(self, conn: Connection) -> None:
        super().setup(conn)
        conn.execute("CREATE TABLE IF NOT EXISTS titles (aggregate_id text, title text)")
        conn.execute("CREATE INDEX IF NOT EXISTS titles_title_idx ON titles (title)")

    def apply_batch(self, events: Sequence[RecordedEvent], tx: Tx) -> None:
        for e in events:
            tx.execute("INSERT INTO titles VALUES (%s, %s)", (e.aggregate_id, e.payload.get("title", "")))
        super().apply_batch(events, tx)


def test_a_poison_event_failing_with_a_database_error_is_parked(db_url: str) -> None:
    # psycopg's OperationalError also covers errors a projection's own statement
    # causes (an index row too large, statement_timeout, a deadlock). Taken for a lost
    # connection, such an event was never isolated or parked: the worker reconnected
    # forever, reporting "database unavailable".
    hooks = Collect()
    worker = Worker(
        db_url,
        IndexedTitles(),
        Partition(0, 1),
        WorkerOptions(poll_interval=0.1, poison_policy=PoisonPolicy.PARK, max_retries=1),
        hooks=hooks,
    )
    worker.retry_backoff.initial = worker.retry_backoff.maximum = 0.05
    with connect(db_url, autocommit=True) as conn, _running(worker):
        append(conn, "a", [NewEvent("E", {"title": "fine"})])
        append(conn, "p", [NewEvent("E", {"title": os.urandom(6000).hex()})])  # the poison event
        append(conn, "b", [NewEvent("E", {"title": "fine too"})])
        parked = _wait(lambda: len(dead_letters.list_letters(conn)) == 1, timeout=10)
        kinds = sorted({k for k, _ in hooks.errors})
        causes = sorted({type(e).__name__ for _, e in hooks.errors})
        assert parked, f"never parked; error types {kinds}, errors {causes}, state {worker.state.value}"
        assert applied_count(conn) == 2


# -- a hook whose batch scope fails on exit -----------------------------------------------------


class BrokenExporter(WorkerHooks):
    """A tracing/metrics hook whose scope raises when it closes (say, a failing exporter)."""

    @contextlib.contextmanager
    def batch_scope(self, info: WorkerInfo, events: Sequence[RecordedEvent]) -> Iterator[None]:
        yield
        raise RuntimeError("exporter unavailable")


def test_a_failing_hook_scope_never_stops_event_processing(db_url: str) -> None:
    # A broken exporter must never stop event processing, on leaving a batch's scope
    # as on entering it: it used to roll the batch back and end the worker.
    worker = Worker(
        db_url, Recorder(), Partition(0, 1), WorkerOptions(poll_interval=0.1), hooks=BrokenExporter()
    )
    with connect(db_url, autocommit=True) as conn, _running(worker):
        load_sample(conn, 50, 5)
        applied = _wait(lambda: applied_count(conn) == 50, timeout=5)
        died = not worker.is_alive()
        assert applied and not died, f"applied {applied_count(conn)} of 50; worker died: {worker._error!r}"


# -- an idle worker re-checks its partition index ---------------------------------------------


def test_an_idle_worker_takes_up_an_index_built_while_it_runs(
    conn: Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On a quiet store the re-check must still run, or projectionist_partition_index_used
    # stays 0 (and its alert fires) after the operator built the index.
    load_sample(conn, 100, 10)
    conn.execute("ANALYZE events")
    processor = Processor(Recorder(), Partition(0, 2), batch_size=500)
    processor.start(conn)
    assert processor.reader.indexed is False
    while processor.run_batch(conn).visible:
        pass
    create_indexes(conn, 2, lambda line: None)
    monkeypatch.setattr(processor_module, "INDEX_RECHECK_SECONDS", 0.0)
    time.sleep(0.01)
    outcome = processor.run_batch(conn)  # idle: nothing new
    assert not outcome.visible
    assert processor.reader.indexed is True, processor.unindexed_reason


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


def test_a_session_timed_out_mid_batch_reconnects_instead_of_killing_the_worker(db_url: str) -> None:
    # The server ends the session with SQLSTATE 25P03, which psycopg raises as an
    # InternalError, not an OperationalError: it is still a lost connection, to
    # reconnect from, not a reason for the worker to die.
    with connect(db_url, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{conn.info.dbname}" SET idle_in_transaction_session_timeout = 300')
        load_sample(conn, 20, 5)
        hooks = Collect()
        worker = Worker(db_url, SlowOnce(), Partition(0, 1), WorkerOptions(poll_interval=0.1), hooks=hooks)
        with _running(worker):
            _wait(lambda: applied_count(conn) == 20 or not worker.is_alive(), timeout=10)
            assert worker.is_alive(), f"worker died: {worker._error!r}"
            assert [k for k, _ in hooks.errors] == ["database"]


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


# -- a worker that stays behind does not hoard notifications ------------------------------------


def test_notifications_during_a_long_catch_up_are_not_queued(db_url: str) -> None:
    # psycopg keeps every NOTIFY that arrives during other statements until
    # notifies() runs, and a worker catching up never waits: the queue used
    # to grow with every append for the whole catch-up.
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
        with _running(worker):
            assert _wait(lambda: applied_count(conn) > 0)
            for _ in range(300):
                conn.execute(f"NOTIFY {NOTIFY_CHANNEL}")
            assert worker.state is WorkerState.CATCHING_UP  # still busy: it never waited
            time.sleep(0.2)  # the worker's next statements read the notifications
            assert worker.state is WorkerState.CATCHING_UP
            (worker_conn,) = conns
            # psycopg's own queue (no public accessor): what used to grow.
            assert len(worker_conn._notifies_backlog or ()) == 0


# -- a pool whose workers all die at once ---------------------------------------------------------


class BrokenSetup(Recorder):
    name = "broken_setup"

    def setup(self, conn: Connection) -> None:
        raise RuntimeError("the read model cannot be created")


def test_a_pool_whose_workers_died_before_it_looked_raises_their_error(db_url: str) -> None:
    pool = Supervisor(db_url, BrokenSetup, 2, WorkerOptions(poll_interval=0.1))
    started = pool.start

    def start_and_let_them_die() -> None:
        started()
        for worker in pool.workers:
            assert worker._thread is not None
            worker._thread.join(timeout=15)

    pool.start = start_and_let_them_die  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="cannot be created"):
        pool.run()


def test_a_fenced_worker_is_not_ready_until_it_has_rejoined(db_url: str) -> None:
    hooks = Collect()
    worker = Worker(db_url, Recorder(), Partition(0, 1), WorkerOptions(poll_interval=0.1), hooks=hooks)
    with connect(db_url, autocommit=True) as conn, _running(worker):
        load_sample(conn, 20, 5)
        assert _wait(lambda: applied_count(conn) == 20 and worker.state is WorkerState.LIVE)
        conn.execute("UPDATE projection_checkpoints SET last_global_position = 0")  # moved under it
        assert _wait(lambda: any(kind == "fenced" for kind, _ in hooks.errors))
        assert _wait(lambda: worker.state is WorkerState.LIVE)
    after = [state for state, _ in hooks.states[hooks.states.index((WorkerState.LIVE, "caught up")) :]]
    assert WorkerState.STARTING in after, hooks.states


def test_the_backoff_stays_at_its_cap_after_a_thousand_failures() -> None:
    # multiplier ** attempts overflowed at 1024 attempts (about two hours of
    # an outage at the reconnect cap) and the worker died of OverflowError.
    backoff = Backoff(initial=0.1, maximum=10.0, jitter=0.0)
    backoff.attempts = 5000
    assert backoff.next_delay() == 10.0


# The reconnect backoff was reset as soon as the processor started, before
# anything worked: a read that always fails (here, every read of events
# times out behind a lock) reconnected at the first step, 4 times a second,
# forever, dropping and retaking the partition's ownership each time.
def test_a_failure_after_start_keeps_backing_off(db_url: str) -> None:
    with connect(db_url, autocommit=True) as conn:
        conn.execute(f"ALTER DATABASE {conn.info.dbname} SET lock_timeout = 100")
        load_sample(conn, 20, 2)
    worker = Worker(db_url, Recorder(), Partition(0, 1), WorkerOptions(poll_interval=0.2))
    worker.reconnect_backoff.initial = 0.05
    with connect(db_url) as holder:
        holder.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
        with _running(worker):
            # 0.05, 0.1, 0.2, 0.4, 0.8 s: five attempts take about 1.5 s.
            assert _wait(lambda: worker.reconnect_backoff.attempts >= 5, timeout=15)
        holder.rollback()
    assert worker.reconnect_backoff.attempts >= 5


# A rebuild holding the projection's setup lock (or another worker's setup
# waiting on DDL) left a starting worker deaf to stop() and to SIGTERM, and
# its loop stopped ticking, until the lock was released.
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
            assert _wait(lambda: len(ticks) >= 3, timeout=10)  # alive while it waits
            stopped_at = time.monotonic()
            worker.stop()
            worker.join(timeout=5)
            assert not worker.is_alive()
            assert time.monotonic() - stopped_at < 2
        finally:
            worker.stop()
            holder.execute("SELECT pg_advisory_unlock_all()")
            worker.join(timeout=10)


class _FailsToSetUp(Recorder):
    def setup(self, conn: Connection) -> None:
        raise RuntimeError(f"setup of worker {self.worker_id} failed")


def test_every_pool_workers_failure_is_reported(db_url: str, caplog: pytest.LogCaptureFixture) -> None:
    # Only the first failure is raised; the second was dropped without a word.
    made = iter(range(2))

    def factory() -> Recorder:
        projection = _FailsToSetUp()
        projection.worker_id = next(made)  # type: ignore[attr-defined]
        return projection

    pool = Supervisor(db_url, factory, 2, WorkerOptions(poll_interval=0.2))
    with caplog.at_level("ERROR"), pytest.raises(RuntimeError, match="setup of worker"):
        pool.run()
    assert "setup of worker 0 failed" in caplog.text and "setup of worker 1 failed" in caplog.text


def test_readiness_gives_the_latest_reason_of_a_state() -> None:
    # Failing on the projection, then on the database: /readyz kept the first reason.
    health = HealthHooks()
    worker = Worker("postgresql://unused", Recorder(), Partition(0, 1), hooks=health)
    health.register_worker(worker.info)
    worker._set_state(WorkerState.FAILING, "projection 'recorder' failed on a batch")
    worker._set_state(WorkerState.FAILING, "database unavailable: connection refused")
    assert "database unavailable" in health.readiness().reason


# A worker must give up on a vanished peer within seconds, whether its
# connection is idle (keepalives) or sending (tcp_user_timeout), and so must
# the server: its session holds the partition's ownership lock.
def test_connections_give_up_on_a_vanished_peer_within_seconds(db_url: str) -> None:
    with connect(db_url, autocommit=True) as conn:
        client = conn.info.get_parameters()
        assert (client["keepalives"], client["tcp_user_timeout"]) == ("1", "10000")
        if conn.info.host.startswith("/"):
            return  # a Unix socket has no TCP timeouts for the server to apply
        row = conn.execute("SHOW tcp_user_timeout").fetchone()
        assert row == ("10000",)
