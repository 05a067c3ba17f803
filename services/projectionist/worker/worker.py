"""The worker runtime: connection, partition ownership, wake-ups, reconnects, graceful stop.

One connection holds the partition's session advisory lock, the LISTEN and
the batch transactions: if it dies, the lock dies with it, so no zombie batch
commits after a standby took over (the checkpoint compare-and-set is the second fence).
"""

from __future__ import annotations

import contextlib
import logging
import threading
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
from projectionist.store.connection import NOTIFY_CHANNEL, Connection, connect, connection_lost
from projectionist.store.schema import require_migrated

log = logging.getLogger(__name__)

# Longest uninterrupted sleep, so a stop request is noticed promptly.
_SLICE = 0.2
# After a wake-up that found nothing visible yet (an older transaction is still
# open and fences the read), re-read quickly rather than after a full poll.
_FENCED_RETRY_START = 0.005


class Worker:
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
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.reconnect_backoff = Backoff(initial=0.2, maximum=10.0)
        self.retry_backoff = Backoff(initial=0.5, maximum=30.0, max_attempts=options.max_retries)
        self._isolate = False
        # A NOTIFY arrived while the worker caught up (see _take_notifications).
        self._notified = False

    # -- lifecycle ---------------------------------------------------------

    def stop(self) -> None:
        """Ask the worker to finish its current batch and return."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._run_capturing, name=f"worker-{self.projection.name}-{self.partition}", daemon=True
        )
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
        if self._error is not None:
            raise self._error

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run_capturing(self) -> None:
        try:
            self.run()
        except BaseException as e:  # re-raised by join()
            self._error = e

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
        self._notified = False
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
        fenced_retry: float | None = None
        while not self.stopping:
            self.hooks.on_tick(self.info)
            try:
                outcome = self.processor.run_batch(conn, isolate=self._isolate)
            except ProjectionError as e:
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
                continue
            self._set_state(WorkerState.LIVE, "caught up")
            if outcome.visible:
                fenced_retry = None
            elif fenced_retry is not None:
                # Woken, yet nothing visible: an older transaction still fences
                # the new rows. Its commit sends no NOTIFY of its own, so look
                # again soon, backing off towards the poll interval.
                self._wait_for_events(conn, fenced_retry, poll=fenced_retry >= self.poll_interval)
                fenced_retry = min(fenced_retry * 2, self.poll_interval)
                continue
            if self._wait_for_events(conn, self.poll_interval):
                fenced_retry = _FENCED_RETRY_START

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
        for _ in conn.notifies(timeout=0):
            self._notified = True

    def _wait_for_events(self, conn: Connection, timeout: float, *, poll: bool = True) -> bool:
        """Wait for a NOTIFY or the timeout. Returns True when notified.

        ``poll=False`` is for the quick looks while the read fence hides new
        rows: until they back off to the poll interval their timeouts are not
        the poll timer, and counting them as poll wake-ups would read as NOTIFY
        not arriving.

        A NOTIFY that came during the catch-up or the last batch counts at
        once: it may be for rows that the last read could not see yet.
        """
        if self._notified:
            self._notified = False
            self.hooks.on_wakeup(self.info, "notify")
            return True
        deadline = time.monotonic() + timeout
        while not self.stopping:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if poll:
                    self.hooks.on_wakeup(self.info, "poll")
                return False
            received = False
            for _ in conn.notifies(timeout=min(_SLICE, remaining), stop_after=1):
                received = True
            if received:
                self.hooks.on_wakeup(self.info, "notify")
                return True
            self.hooks.on_tick(self.info)
        return False


def _close_quietly(conn: Connection) -> None:
    # The connection may already be broken; closing it cannot fail usefully.
    with contextlib.suppress(Exception):
        conn.close()
