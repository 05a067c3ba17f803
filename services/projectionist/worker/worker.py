"""The worker runtime: connection, partition ownership, wake-ups, reconnects, graceful stop.

One connection holds the partition's session advisory lock, the LISTEN and
the batch transactions: if it dies, the lock dies with it, so no zombie batch
commits after a standby took over (the checkpoint compare-and-set is the second fence).
"""

from __future__ import annotations

import contextlib
import logging
import math
import select
import time
from collections.abc import Callable

import psycopg
from psycopg import sql

from projectionist.backoff import Backoff
from projectionist.consume.checkpoints import GroupConfig, register_group
from projectionist.consume.ownership import TRY_LOCK, group_key
from projectionist.consume.partition_indexes import NO_STATISTICS
from projectionist.consume.processor import INDEX_RECHECK_SECONDS, Processor
from projectionist.consume.projection import Projection
from projectionist.errors import ConfigError, FencedError, PoisonEventError, ProjectionError, one_line
from projectionist.hooks import HookChain, OwnershipReason, WorkerHooks, WorkerInfo, WorkerState
from projectionist.partitioning import Partition
from projectionist.settings import WorkerOptions
from projectionist.store import doorbell
from projectionist.store.connection import NOTIFY_CHANNEL, Connection, connect, connection_lost
from projectionist.store.schema import require_migrated
from projectionist.worker.threaded import Threaded

log = logging.getLogger(__name__)

# Longest uninterrupted sleep, so a stop request is noticed promptly.
_SLICE = 0.2

# How a caught-up worker looks for new events (docs/design/notifications.md).
# While its group is busy, rows keep coming and it polls: a batch
# BUSY_FIRST_LOOK after a batch that found new rows, then one-statement looks
# backing off to BUSY_LONGEST_LOOK while nothing comes, and no append needs
# to NOTIFY. After BUSY_WINDOW without new rows it goes to sleep behind the
# doorbell: appends NOTIFY while it sleeps, and its poll interval bounds a
# missed one. The elastic runtime (elastic.py) waits the same way.
BUSY_FIRST_LOOK = 0.003
BUSY_LONGEST_LOOK = 0.024
BUSY_WINDOW = 0.15
# Asleep, with committed rows hidden behind the read fence (an older
# transaction is still open): their appends will not NOTIFY again, so look
# again after 5, 10, 20 ms and so on, up to the poll interval.
FENCED_RETRY_START = 0.005


class Worker(Threaded):
    """Runs one partition until :meth:`stop` is called.

    Use :meth:`run` in the calling thread, or :meth:`start` for a background
    thread (then :meth:`join` re-raises a fatal error from that thread).
    """

    def __init__(
        self,
        database_url: str,
        projection: Projection,
        partition: Partition,
        options: WorkerOptions | None = None,
        *,
        hooks: WorkerHooks | None = None,
        connect_fn: Callable[..., Connection] = connect,
    ) -> None:
        self.database_url = database_url
        self.projection = projection
        self.partition = partition
        self.options = options = options or WorkerOptions()
        self.poll_interval = options.poll_interval
        self.hooks = hooks if isinstance(hooks, HookChain) else HookChain([hooks] if hooks else [])
        self.processor = Processor(
            projection,
            partition,
            batch_size=options.batch_size,
            hooks=self.hooks,
            policy=options.poison_policy,
        )
        self.info = WorkerInfo(projection.name, partition.worker_id, partition.total_workers)
        self.state = WorkerState.STARTING
        self._reason = "starting"
        self._connect = connect_fn
        super().__init__()
        self.thread_name = f"worker-{self.projection.name}-{self.partition}"
        self.reconnect_backoff = Backoff(initial=0.2, maximum=10.0)
        self.retry_backoff = Backoff(initial=0.5, maximum=30.0, max_attempts=options.max_retries)
        self._isolate = False
        # The source of a NOTIFY that arrived while the worker caught up (see _take_notifications).
        self._notified: str | None = None
        # Wake-up state of the current connection (see _wait_for_work).
        self._holds_doorbell = False
        self._doorbell_armed = False
        self._active_at = -math.inf
        self._next_look = BUSY_FIRST_LOOK
        self._fenced_retry: float | None = None

    # -- lifecycle ---------------------------------------------------------

    def _set_state(self, state: WorkerState, reason: str) -> None:
        # A new reason in the same state is news too: /readyz said a worker
        # that lost the database was still failing on the projection's error.
        if state != self.state or reason != self._reason:
            self.state, self._reason = state, reason
            self.hooks.on_state(self.info, state, reason)

    def _sleep(self, seconds: float) -> None:
        self._stop.wait(seconds)

    # -- main loop ---------------------------------------------------------

    def run(self) -> None:
        """Process until stopped. Raises only for errors a restart cannot fix."""
        self._set_state(WorkerState.STARTING, "starting")
        owned = False
        while not self.stopping:
            conn: Connection | None = None
            try:
                conn = self._connect(
                    self.database_url,
                    application_name=f"projectionist:{self.projection.name}:{self.partition.worker_id}",
                    autocommit=True,
                )
                # An unmigrated database is no outage to wait out: it fails the worker.
                require_migrated(conn)
                if self._acquire_ownership(conn):
                    owned = True
                    self.hooks.on_ownership(self.info, True, OwnershipReason.ACQUIRED)
                    self._serve(conn)
            except ConfigError:
                raise
            except psycopg.Error as e:
                # An OperationalError, or any error that came with the session's end
                # (idle_in_transaction_session_timeout raises an InternalError).
                if not (isinstance(e, psycopg.OperationalError) or connection_lost(e, conn)):
                    raise
                delay = self.reconnect_backoff.next_delay()
                self.hooks.on_error(self.info, "database", e)
                self._set_state(WorkerState.FAILING, f"database unavailable: {one_line(e)}")
                log.warning(
                    "worker %s: database unavailable (%s); reconnecting in %.1fs (attempt %d)",
                    self.partition,
                    one_line(e),
                    delay,
                    self.reconnect_backoff.attempts,
                )
                self._sleep(delay)
            except FencedError as e:
                self.hooks.on_error(self.info, "fenced", e)
                # Not ready until it has re-checked ownership: it may have lost it.
                self._set_state(WorkerState.STARTING, f"fenced, re-checking ownership: {one_line(e)}")
                log.error("worker %s: %s; reconnecting to re-check ownership", self.partition, e)
                self._sleep(self.reconnect_backoff.next_delay())
            finally:
                if conn is not None:
                    _close_quietly(conn)  # the session lock goes with the session
                if owned:
                    owned = False
                    reason = OwnershipReason.STOPPED if self.stopping else OwnershipReason.LOST
                    self.hooks.on_ownership(self.info, False, reason)
        self._set_state(WorkerState.STOPPING, "stop requested")
        log.info("worker %s of %s stopped", self.partition, self.projection.name)

    def _acquire_ownership(self, conn: Connection) -> bool:
        """Take the partition's session lock, waiting as a standby while another process has it."""
        key = (group_key(self.projection.name, self.partition.total_workers), self.partition.worker_id)
        announced = False
        while not self.stopping:
            row = conn.execute(TRY_LOCK, key).fetchone()
            if row and row[0]:
                if announced:
                    log.info("worker %s: took over partition ownership", self.partition)
                return True
            if not announced:
                self._set_state(WorkerState.STANDBY, "another process owns this partition")
                log.warning(
                    "worker %s of %s is owned by another process; waiting as standby",
                    self.partition,
                    self.projection.name,
                )
                announced = True
            self.hooks.on_tick(self.info)
            self._sleep(0.5)
        return False

    def _join_group(self, conn: Connection) -> GroupConfig | None:
        """Register with the projection's group, waiting while a rescale drains the old one."""
        while not self.stopping:
            joined = register_group(
                conn, self.projection.name, self.partition.total_workers, allow_rescale=self.options.rescale
            )
            if isinstance(joined, GroupConfig):
                return joined
            self._set_state(
                WorkerState.STANDBY,
                f"waiting for the old group of {joined.old_total_workers} partitions to stop "
                f"(still running: {', '.join(map(str, joined.live_workers))})",
            )
            self.hooks.on_tick(self.info)
            self._sleep(1.0)
        return None

    def _serve(self, conn: Connection) -> None:
        group = self._join_group(conn)
        if group is None:
            return
        conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(NOTIFY_CHANNEL)))
        self._notified = None
        if not self.processor.start(conn, group.layers, keep_waiting=lambda: not self.stopping):
            return
        if self.reconnect_backoff.attempts:
            log.info("worker %s: reconnected to the database", self.partition)
        log.info(
            "worker %s of %s started at position %s",
            self.partition,
            self.projection.name,
            self.processor.position,
        )
        reason = self.processor.unindexed_reason
        if reason == NO_STATISTICS:
            log.info(
                "worker %s: reads without its partition index until %s; it checks every %.0f s",
                self.partition,
                reason,
                INDEX_RECHECK_SECONDS,
            )
        elif reason is not None:
            # Correct either way; without its index each read steps over the
            # other partitions' rows, so the server's read work grows with N.
            log.warning(
                "worker %s: reads without its partition index, stepping over the other partitions' "
                "rows: %s. Build them with `projectionist partition-index create --partitions %s`; "
                "the worker checks every %.0f s",
                self.partition,
                reason,
                self.partition.total_workers,
                INDEX_RECHECK_SECONDS,
            )
        self._set_state(WorkerState.CATCHING_UP, "connected")
        self._holds_doorbell = self._doorbell_armed = False
        self._active_at = -math.inf
        self._fenced_retry = None
        try:
            self._process(conn)
        finally:
            if self._holds_doorbell:
                # The sleepers that relied on this doorbell must check it again.
                with contextlib.suppress(psycopg.Error):
                    doorbell.leave(conn, ring=True)
                self._holds_doorbell = False

    def _process(self, conn: Connection) -> None:
        while not self.stopping:
            self.hooks.on_tick(self.info)
            try:
                outcome = self.processor.run_batch(conn, isolate=self._isolate)
            except ProjectionError as e:
                # Failing, not asleep: appends must not NOTIFY for it meanwhile.
                self._wake(conn, notified=False)
                self._projection_failed(e)
                continue
            self._isolate = False
            # Only a batch that went through shows the connection works: a
            # failure that comes after start (a read always cancelled by a
            # timeout, a session killed at once) must keep backing off, not
            # reconnect at the first step forever.
            self.reconnect_backoff.reset()
            if self.retry_backoff.attempts:
                log.info("worker %s: recovered, processing again", self.partition)
                self.retry_backoff.reset()
            if outcome.more:
                self._set_state(WorkerState.CATCHING_UP, "more events waiting")
                self._take_notifications(conn)
                self._wake(conn, notified=False)
                continue
            self._set_state(WorkerState.LIVE, "caught up")
            if outcome.visible:
                # New rows, ours or another partition's: more are likely on the way.
                self._wake(conn, notified=False)
            self._wait_for_work(conn)

    def _wake(self, conn: Connection, *, notified: bool) -> None:
        """The group is busy: poll soon, and leave the doorbell so that appends stop notifying.

        A holder woken by a NOTIFY leaves quietly: every sleeper got the same
        NOTIFY. Any other holder rings as it leaves, since the sleepers that
        found the doorbell taken rely on appends ringing it.
        """
        self._active_at = time.monotonic()
        self._next_look = BUSY_FIRST_LOOK
        self._fenced_retry = None
        self._doorbell_armed = False
        if self._holds_doorbell:
            doorbell.leave(conn, ring=not notified)
            self._holds_doorbell = False

    def _wait_for_work(self, conn: Connection) -> None:
        """Return when the next batch is due: new rows are visible, a NOTIFY came, or a poll is due."""
        while not self.stopping:
            if time.monotonic() - self._active_at < BUSY_WINDOW:
                # Busy: rows came a moment ago, more are likely. Look, without a NOTIFY.
                # Right after a batch that found rows, the next batch is the look:
                # it usually finds rows too, and a look first would cost a round
                # trip more. After that, a one-statement look decides.
                right_after_rows = self._next_look == BUSY_FIRST_LOOK
                if self._wait_for_events(conn, self._next_look, timeout_source="busy_poll"):
                    self._wake(conn, notified=True)
                    return
                self._next_look = min(self._next_look * 2, BUSY_LONGEST_LOOK)
                if right_after_rows or self._look(conn).visible:
                    return
                continue
            if not self._doorbell_armed:
                turn = doorbell.try_to_sleep(conn)
                if turn is doorbell.Turn.APPENDING:
                    # Uncommitted appends hold it: their rows come at their commit.
                    if self._wait_for_events(conn, BUSY_LONGEST_LOOK, timeout_source="busy_poll"):
                        self._wake(conn, notified=True)
                        return
                    if self._look(conn).visible:
                        return
                    continue
                self._holds_doorbell = turn is doorbell.Turn.HOLDER
                self._doorbell_armed = True
            # Armed: every append that did not ring has committed, and this look sees it.
            news = self._look(conn)
            if news.visible:
                return
            if news.hidden:
                # Committed rows behind the read fence: their appends will not
                # NOTIFY again, so look again soon, backing off to the poll interval.
                self._fenced_retry = (
                    FENCED_RETRY_START
                    if self._fenced_retry is None
                    else min(self._fenced_retry * 2, self.poll_interval)
                )
                if self._wait_for_events(conn, self._fenced_retry, timeout_source="busy_poll"):
                    self._wake(conn, notified=True)
                    return
                continue
            self._fenced_retry = None
            if self._wait_for_events(conn, self.poll_interval, timeout_source="poll"):
                self._wake(conn, notified=True)
                return
            if not self._holds_doorbell:
                # The sleeper this one relied on may be gone: check again before sleeping on.
                self._doorbell_armed = False
            return  # the poll interval's batch

    def _look(self, conn: Connection) -> doorbell.Look:
        """One statement's look past the checkpoint; rows it sees keep the group busy."""
        assert self.processor.position is not None
        news = doorbell.look(conn, self.processor.position)
        if news.visible:
            self._active_at = time.monotonic()
        return news

    def _projection_failed(self, error: ProjectionError) -> None:
        """Back off and retry; once retries run out, isolate the poison event (consume/dead_letters.py)."""
        delay = self.retry_backoff.next_delay()
        poison = isinstance(error, PoisonEventError)
        self.hooks.on_error(self.info, "poison" if poison else "projection", error)
        self._set_state(WorkerState.FAILING, one_line(error))
        # The failed batch was rolled back and the checkpoint did not move past
        # the failing event, so retrying can never skip it.
        log.error(
            "worker %s: %s; retrying in %.1fs (attempt %d)",
            self.partition,
            error,
            delay,
            self.retry_backoff.attempts,
            exc_info=None if poison else error.__cause__,
        )
        if self.retry_backoff.exhausted() and not self._isolate:
            self._isolate = True
            self.processor.attempts_before_isolation = self.retry_backoff.attempts
            log.warning(
                "worker %s: batch failed %d times; applying events one by one to isolate the poison "
                "event (POISON_POLICY=%s)",
                self.partition,
                self.retry_backoff.attempts,
                self.processor.policy.value,
            )
        self._sleep(delay)

    def _take_notifications(self, conn: Connection) -> None:
        """Empty psycopg's queue of notifications, without waiting; remember whether there were any.

        psycopg keeps every NOTIFY that arrives during other statements until
        notifies() runs, and a worker catching up never waits: without this
        the queue grew with every append for as long as the catch-up lasted.
        """
        source = _received(conn)
        if source is not None and self._notified != "notify":
            self._notified = source

    def _wait_for_events(self, conn: Connection, timeout: float, *, timeout_source: str) -> bool:
        """Wait for a NOTIFY or the timeout. Returns True when notified.

        The wake-up is counted as ``notify`` (an append's) or ``relay`` (a
        peer's, see _received), or as ``timeout_source`` when the time ran
        out: ``poll`` for the poll interval of a sleeping worker, ``busy_poll``
        for the short looks while new rows are expected.

        A NOTIFY that came during the catch-up or the last batch counts at
        once: it may be for rows that the last read could not see yet.
        """
        if self._notified is not None:
            self.hooks.on_wakeup(self.info, self._notified)
            self._notified = None
            return True
        deadline = time.monotonic() + timeout
        while not self.stopping:
            source = _received(conn)
            if source is not None:
                self.hooks.on_wakeup(self.info, source)
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.hooks.on_wakeup(self.info, timeout_source)
                return False
            # Waiting on the socket here, not in notifies(timeout=...): psycopg
            # waits in whole milliseconds and spins through the last one, which
            # for the short looks of a busy worker was a third of the wait.
            select.select([conn.fileno()], [], [], min(_SLICE, remaining))
            self.hooks.on_tick(self.info)
        return False


def _received(conn: Connection) -> str | None:
    """Take the notifications that arrived, without waiting; the wake-up source they make, if any.

    ``notify`` when an append (or a Notifier) sent one; ``relay`` when only a
    worker leaving the doorbell did, which tells the operator that appends'
    wake-ups reach the group or not. A worker's own ring comes back to it
    too: no news.
    """
    own = conn.info.backend_pid
    payloads = {n.payload for n in conn.notifies(timeout=0) if n.pid != own}
    if not payloads:
        return None
    return "relay" if payloads == {doorbell.RELAY} else "notify"


def _close_quietly(conn: Connection) -> None:
    # The connection may already be broken; closing it cannot fail usefully.
    with contextlib.suppress(Exception):
        conn.close()
