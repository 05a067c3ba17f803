"""One batch: read the partition's next events, apply them, move the checkpoint, commit.

The projection's writes and the checkpoint update share one transaction, so a
crash at any point either keeps both or neither: exactly-once effect for read
models in the same database.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import NamedTuple

import psycopg
from psycopg import sql

from projectionist import records
from projectionist.consume import dead_letters, partition_indexes
from projectionist.consume.checkpoints import check_checkpoint, load_checkpoint, save_checkpoint
from projectionist.consume.projection import Projection, Tx
from projectionist.consume.reader import Batch, PartitionReader, PendingRead, RetiredGroupMarks
from projectionist.errors import PoisonEventError, ProjectionError
from projectionist.hooks import BatchResult, WorkerHooks, WorkerInfo
from projectionist.partitioning import Partition, fnv1a_32
from projectionist.records import Position, RecordedEvent, UndecodablePayload
from projectionist.settings import PoisonPolicy
from projectionist.store.connection import Connection, connection_lost
from projectionist.store.streams import read_events

log = logging.getLogger(__name__)

#: How often a worker of several partitions checks whether its partition index is usable.
INDEX_RECHECK_SECONDS = 30.0

# Read-ahead needs libpq's pipeline mode (libpq 14 or later); without it every batch reads in turn.
_PIPELINE = psycopg.Pipeline.is_supported()

#: One lock per projection, held by its setup (and a rebuild's reset) until the transaction ends.
SETUP_LOCK = sql.SQL("SELECT pg_advisory_xact_lock(hashtext('projectionist.setup'), hashtext(%s))")
_SETUP_LOCK_TURN_MS = 250


class BatchOutcome(NamedTuple):
    applied: int
    """Events of this partition applied and committed."""
    more: bool
    """The batch was full: read again without waiting."""
    visible: bool
    """Any new row at all was visible, ours or another partition's."""


class Processor:
    """Applies one partition of one projection, batch by batch, on a given connection."""

    def __init__(
        self,
        projection: Projection,
        partition: Partition,
        *,
        batch_size: int = 500,
        hooks: WorkerHooks | None = None,
        policy: PoisonPolicy = PoisonPolicy.STOP,
        lock_fence: bool = False,
    ) -> None:
        self.projection = projection
        #: Each checkpoint update also requires that this session holds the partition's
        #: ownership lock (see checkpoints.save_checkpoint): elastic workers set it.
        self.lock_fence = lock_fence
        self.partition = partition
        self.reader = PartitionReader(partition, batch_size)
        self.hooks = hooks or WorkerHooks()
        self.info = WorkerInfo(projection.name, partition.worker_id, partition.total_workers)
        self.position: Position | None = None
        self.policy = policy
        #: How often the worker retried the whole batch before isolating (for the dead letter).
        self.attempts_before_isolation = 0
        self._open_letters = False
        self._read_ahead: PendingRead | None = None
        self._index_checked_at = 0.0
        #: Why the reads walk the main index, not the partition's own (None while they do not).
        self.unindexed_reason: str | None = None
        batch_handler = getattr(projection, "apply_batch", None)
        self._apply_batch: Callable[[Sequence[RecordedEvent], Tx], None] | None = (
            batch_handler if callable(batch_handler) else None
        )

    def start(
        self,
        conn: Connection,
        layers: tuple[RetiredGroupMarks, ...] = (),
        *,
        keep_waiting: Callable[[], bool] | None = None,
    ) -> bool:
        """Prepare the projection and load the checkpoint (after every reconnect).

        ``layers`` are the skip marks of retired groups after a rescale.
        ``keep_waiting`` is asked while another process holds the setup lock;
        once it says no, nothing is started and the result is False.
        """
        # The worker's session settings, in one round trip:
        # - TimeZone: projections see one clock whatever the server's default
        #   zone, so a read model rebuilt on another server comes out the same
        #   (dates cut with date_trunc or ::date included), and created_at
        #   arrives as a UTC datetime, which psycopg builds without a zoneinfo
        #   lookup per row (about a tenth of reading a row under a named zone).
        # - synchronous_commit: batches need not wait for their WAL flush. If
        #   the server crashes before a batch's commit is durable, the read
        #   model's writes and the checkpoint are lost together and the batch
        #   is simply applied again, so the effect stays exactly-once; waiting
        #   cost up to a third of a catch-up's time. (Setup's idempotent DDL
        #   runs again after any reconnect, so it needs no flush either.)
        conn.execute(
            "SELECT set_config('TimeZone', 'UTC', false), set_config('synchronous_commit', 'off', false)"
        )
        with conn.transaction():
            # Workers of one projection start together and would race on
            # CREATE TABLE IF NOT EXISTS (it is not atomic against a concurrent
            # create); a transaction lock per projection makes them take turns.
            if not self._setup_lock(conn, keep_waiting):
                return False
            self.projection.setup(conn)
        self.position = load_checkpoint(conn, self.projection.name, self.partition)
        self._drop_read_ahead()
        self.reader = PartitionReader(self.partition, self.reader.batch_size, layers)
        self._check_index(conn)
        self.reader.forget_passed_marks(self.position)
        with conn.transaction():
            self._open_letters = bool(
                dead_letters.open_letters(conn, self.projection.name, self.partition).blocked_aggregates
            )
        return True

    def close(self) -> None:
        """Let go of what it holds on the connection (a read-ahead) before the partition moves on."""
        self._drop_read_ahead()

    def _setup_lock(self, conn: Connection, keep_waiting: Callable[[], bool] | None) -> bool:
        key = (self.projection.name,)
        if keep_waiting is None:
            conn.execute(SETUP_LOCK, key)
            return True
        # A `rebuild` resetting the projection, or a worker whose setup waits
        # on DDL, can hold it for long, and the worker must still stop when
        # told and tick for its liveness probe. So it waits in short turns,
        # each in a savepoint that a lock timeout rolls back; between turns
        # it is still a lock waiter to anyone looking at pg_stat_activity.
        row = conn.execute(
            "SELECT current_setting('lock_timeout'), set_config('lock_timeout', %s, true)",
            (f"{_SETUP_LOCK_TURN_MS}ms",),
        ).fetchone()
        assert row is not None
        try:
            while True:
                try:
                    with conn.transaction():
                        conn.execute(SETUP_LOCK, key)
                    return True
                except psycopg.errors.LockNotAvailable:
                    if not keep_waiting():
                        return False
                    self.hooks.on_tick(self.info)
        finally:
            # The projection's setup runs under the session's own setting.
            conn.execute("SELECT set_config('lock_timeout', %s, true)", (row[0],))

    def run_batch(self, conn: Connection, *, isolate: bool = False) -> BatchOutcome:
        """Process one batch and commit it with the checkpoint (see :meth:`_run_batch`)."""
        outcome = self._run_batch(conn, isolate=isolate)
        if time.monotonic() - self._index_checked_at > INDEX_RECHECK_SECONDS:
            self._check_index(conn)
        return outcome

    def _run_batch(self, conn: Connection, *, isolate: bool = False) -> BatchOutcome:
        """Process one batch and commit it with the checkpoint.

        ``isolate`` applies events one by one in savepoints, to find a poison
        event after the batch kept failing; the poison policy then decides
        (see dead_letters.py). Under ``stop`` the events before the poison
        event are committed and :class:`PoisonEventError` is raised.
        """
        assert self.position is not None, "call start() first"
        started = time.perf_counter()
        stopped_by: PoisonEventError | None = None
        with conn.transaction():
            batch = self._read(conn, read_ahead=not isolate)
            tx = Tx(conn, self.projection.name, self.partition.worker_id, self.partition.total_workers)
            # Retries requested by an operator run even when no new event came
            # in; they commit with this (possibly otherwise empty) transaction.
            blocked = self._unblock_retried(conn, tx) if self._letters_possible() else set()
            if batch.end is None:
                # Nothing to commit, so no compare-and-set: still make sure nobody
                # moved the checkpoint (a rebuild --force) while this worker idles.
                check_checkpoint(conn, self.projection.name, self.partition, self.position)
                return BatchOutcome(0, False, False)
            end = batch.end
            # A read that found only other partitions' rows just moves the checkpoint: no span for it.
            scope = self.hooks.batch_scope(self.info, batch.events) if batch.events else nullcontext()
            applied_events: Sequence[RecordedEvent]
            with scope:
                if isolate:
                    end, applied_events, stopped_by = self._apply_isolated(
                        conn, tx, batch.events, blocked, end
                    )
                else:
                    applied_events = self._park_blocked(conn, batch.events, blocked)
                    self._apply(applied_events, tx)
            applied = len(applied_events)
            applied_at = None
            if end != self.position:
                applied_at = save_checkpoint(
                    conn,
                    self.projection.name,
                    self.partition,
                    self.position,
                    end,
                    applied,
                    lock_fence=self.lock_fence,
                )
        if end != self.position:
            self.position = end
            self.reader.forget_passed_marks(end)
            self.hooks.after_batch(
                self.info,
                BatchResult(
                    events=applied,
                    duration_seconds=time.perf_counter() - started,
                    checkpoint=end,
                    last_event=batch.events[-1] if batch.events and stopped_by is None else None,
                    applied=applied_events,
                    applied_at=applied_at,
                ),
            )
        if stopped_by is not None:
            raise stopped_by
        return BatchOutcome(applied, batch.more, True)

    def _check_index(self, conn: Connection) -> None:
        """Read through the partition's own index while it is usable (see partition_indexes.py).

        Checked at every start and then every INDEX_RECHECK_SECONDS, so an
        index built or dropped while the worker runs is taken up or let go
        without a restart, and a table analyzed for the first time is noticed.
        """
        self._index_checked_at = time.monotonic()
        if self.partition.total_workers == 1:
            self.hooks.on_read_path(self.info, True, None)
            return
        reason = partition_indexes.why_not_ready(conn, self.partition.total_workers, self.partition.worker_id)
        if (reason is None) != self.reader.indexed:
            log.info(
                "worker %s: %s",
                self.partition,
                "now reads through its partition index"
                if reason is None
                else f"no longer reads through its partition index: {reason}",
            )
        self.unindexed_reason = reason
        self.reader.use_index(reason is None)
        self.hooks.on_read_path(self.info, reason is None, reason)

    def _read(self, conn: Connection, *, read_ahead: bool) -> Batch:
        """This batch's events; when it is full, the next batch's read is already sent.

        Read-ahead: while the client turns a full batch's rows into events
        (most of a no-op catch-up's time), the server runs the next batch's
        query, sent in pipeline mode just before. The read-ahead is used only
        if the next batch starts exactly where it was read from, on the same
        connection: after a rollback, a rescale's new reader or a reconnect
        it is dropped and read again. It runs inside this batch's transaction,
        which changes nothing for it: events are never updated, and the fence
        in its WHERE clause is taken from its own snapshot.
        """
        assert self.position is not None
        pending = self._take_read_ahead(conn) or self.reader.send(conn, self.position)
        start = pending.next_start() if read_ahead and _PIPELINE else None
        if start is None:
            return pending.batch()
        # The read-ahead is the only statement sent in pipeline mode; this
        # batch's rows are decoded while the server runs it. Leaving the block
        # syncs (waits for the read-ahead's rows) before the projection runs,
        # so projections always see plain, synchronous statements.
        with conn.pipeline():
            self._read_ahead = self.reader.send(conn, start)
            return pending.batch()

    def _take_read_ahead(self, conn: Connection) -> PendingRead | None:
        pending, self._read_ahead = self._read_ahead, None
        if pending is None or (pending.conn is conn and pending.after == self.position):
            return pending
        pending.discard()
        return None

    def _drop_read_ahead(self) -> None:
        if self._read_ahead is not None:
            self._read_ahead.discard()
            self._read_ahead = None

    def _apply(self, events: Sequence[RecordedEvent], tx: Tx) -> None:
        if not events:
            return
        try:
            if records.undecodable_seen:
                for event in events:
                    payload: object = event.payload
                    if isinstance(payload, UndecodablePayload):
                        raise payload.error  # the reader could not decode it: this event's failure
            if self._apply_batch is not None:
                self._apply_batch(events, tx)
            else:
                for event in events:
                    self.projection.apply(event, tx)
        except Exception as e:
            if connection_lost(e, tx.conn):
                raise  # the connection failed, not the projection
            # Any other error, a database error included (an index row too large,
            # statement_timeout, a deadlock), is the projection's: retried, then isolated.
            raise ProjectionError(
                f"projection {self.projection.name!r} failed on a batch starting at "
                f"global position {events[0].global_position}: {e!r}"
            ) from e

    # -- poison events -------------------------------------------------------

    def _letters_possible(self) -> bool:
        return self.policy is PoisonPolicy.PARK or self._open_letters

    def _unblock_retried(self, conn: Connection, tx: Tx) -> set[str]:
        """Re-apply letters an operator asked to retry; return the aggregates still blocked."""
        letters = dead_letters.open_letters(conn, self.projection.name, self.partition)
        self._open_letters = bool(letters.blocked_aggregates)
        blocked = set(letters.blocked_aggregates)
        if not letters.retry:
            return blocked
        events = {
            str(e.event_id): e for e in read_events(conn, [letter.event_id for letter in letters.retry])
        }
        failed: set[str] = set()
        for letter in letters.retry:
            if letter.aggregate_id in failed:
                continue  # an earlier event of this aggregate failed again: stay behind it
            try:
                with conn.transaction():
                    self._apply([events[letter.event_id]], tx)
                dead_letters.resolve(conn, letter.id)
            except ProjectionError as e:
                dead_letters.repark(conn, letter.id, e.__cause__ or e)
                failed.add(letter.aggregate_id)
        return blocked - ({letter.aggregate_id for letter in letters.retry} - failed)

    def _park_blocked(
        self, conn: Connection, events: Sequence[RecordedEvent], blocked: set[str]
    ) -> Sequence[RecordedEvent]:
        if not blocked:
            return events
        kept = []
        for event in events:
            if event.aggregate_id in blocked:
                dead_letters.park(
                    conn, self.projection.name, event, fnv1a_32(event.aggregate_id), error=None, attempts=0
                )
            else:
                kept.append(event)
        return kept

    def _apply_isolated(
        self,
        conn: Connection,
        tx: Tx,
        events: Sequence[RecordedEvent],
        blocked: set[str],
        end: Position,
    ) -> tuple[Position, list[RecordedEvent], PoisonEventError | None]:
        """Apply one by one; return where the checkpoint may move, the events applied, and a stop."""
        previous = self.position
        assert previous is not None
        applied: list[RecordedEvent] = []
        for event in events:
            if event.aggregate_id in blocked:
                self._park_blocked(conn, [event], blocked)
                previous = Position(event.transaction_id, event.global_position)
                continue
            try:
                with conn.transaction():  # a savepoint: a failure undoes only this event
                    self._apply([event], tx)
                applied.append(event)
            except ProjectionError as e:
                cause = e.__cause__ or e
                if self.policy is PoisonPolicy.PARK:
                    dead_letters.park(
                        conn,
                        self.projection.name,
                        event,
                        fnv1a_32(event.aggregate_id),
                        error=cause,
                        attempts=self.attempts_before_isolation + 1,
                    )
                    self._open_letters = True
                    blocked.add(event.aggregate_id)
                    self.hooks.on_error(self.info, "parked", cause)
                else:
                    # stop: keep what precedes the poison event, never move past it.
                    return previous, applied, PoisonEventError(event, cause, applied_before=len(applied))
            previous = Position(event.transaction_id, event.global_position)
        return end, applied, None
