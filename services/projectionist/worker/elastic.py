"""The elastic worker: joins its projection's group and processes its fair share of the partitions.

One connection does everything: it holds the member lock and the ownership
lock of every partition the process owns, LISTENs, and runs every batch. So
a process uses one database connection however many partitions it owns,
and when that session ends, the server releases the member and all its
partitions at once, with any batch in flight. The runtime is one thread:
a partition is released only between two of its batches (after a commit),
and the checkpoint update also checks on the server that this session still
holds the partition's lock (``lock_fence``). Membership and the fair share:
consume/membership.py; the design: ``docs/concepts/elastic.md``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from projectionist.backoff import Backoff
from projectionist.consume import membership, partition_indexes
from projectionist.consume.checkpoints import GroupConfig, group_partitions, register_group
from projectionist.consume.processor import Processor
from projectionist.consume.projection import Projection
from projectionist.errors import ConfigError, FencedError, PoisonEventError, ProjectionError, one_line
from projectionist.hooks import (
    HookChain,
    Membership,
    OwnershipReason,
    WorkerHooks,
    WorkerInfo,
    WorkerState,
)
from projectionist.partitioning import Partition
from projectionist.settings import DEFAULT_ELASTIC_PARTITIONS, WorkerOptions
from projectionist.store import doorbell
from projectionist.store.connection import NOTIFY_CHANNEL, Connection, connect, connection_lost
from projectionist.store.schema import require_migrated
from projectionist.worker.threaded import Threaded
from projectionist.worker.worker import BUSY_FIRST_LOOK, BUSY_LONGEST_LOOK, BUSY_WINDOW, FENCED_RETRY_START

log = logging.getLogger(__name__)

# Longest uninterrupted wait, so a stop request is noticed promptly.
_SLICE = 0.2


def default_member_name() -> str:
    """``host:pid``: the pod's name in Kubernetes, and unique among processes of one host."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class _Slot:
    """One owned partition: its processor, and its own retry state, so a failing one stalls only itself."""

    info: WorkerInfo
    processor: Processor
    retry_backoff: Backoff
    state: WorkerState = WorkerState.CATCHING_UP
    reason: str = "assigned"
    #: Not run again before this monotonic time (a failing batch's back-off).
    due_at: float = 0.0
    isolate: bool = False
    acquired_at: float = field(default_factory=time.monotonic)


class _Regroup(Exception):
    """The group changed under the member (a rescale): leave and join it again."""


class ElasticWorker(Threaded):
    """Runs a fair share of a projection's partitions until :meth:`stop` is called.

    ``projection_factory`` makes one projection instance per owned partition,
    as ``pool`` does. ``partitions`` is the partition count of a group this
    worker creates; a group that exists keeps its own (``rescale`` changes it).
    Use :meth:`run` in the calling thread, or :meth:`start` for a background
    thread (then :meth:`join` re-raises a fatal error from that thread).
    """

    def __init__(
        self,
        database_url: str,
        projection_factory: Callable[[], Projection],
        options: WorkerOptions | None = None,
        *,
        partitions: int = DEFAULT_ELASTIC_PARTITIONS,
        name: str | None = None,
        hooks: WorkerHooks | None = None,
        connect_fn: Callable[..., Connection] = connect,
        rng: random.Random | None = None,
    ) -> None:
        if partitions < 1:
            raise ConfigError(f"PARTITIONS={partitions} must be at least 1")
        self.database_url = database_url
        self.projection_factory = projection_factory
        self.projection_name = projection_factory().name
        self.options = options = options or WorkerOptions()
        self.partitions = partitions
        self.name = name or default_member_name()
        self.hooks = hooks if isinstance(hooks, HookChain) else HookChain([hooks] if hooks else [])
        self._connect = connect_fn
        self._rng = rng or random.Random()
        super().__init__()
        self.thread_name = f"elastic-{self.projection_name}"
        self.reconnect_backoff = Backoff(initial=0.2, maximum=10.0)
        #: The group joined (None while not a member), this member's number, and its owned partitions.
        self.group: GroupConfig | None = None
        self.number: int | None = None
        self.slots: dict[int, _Slot] = {}
        self.state = WorkerState.STARTING
        self._reason = "starting"
        self._members: tuple[int, ...] | None = None
        self._target = 0
        self._look_at = 0.0
        self._look_now = False
        # Waking, as the static worker does (see _wait_for_work): the source of a
        # NOTIFY that came during a round, and the doorbell's state on this connection.
        self._notified: str | None = None
        self._own_pid = 0
        self._active_at = 0.0
        self._next_look = BUSY_FIRST_LOOK
        self._fenced_retry: float | None = None
        self._holds_doorbell = False
        self._doorbell_armed = False
        self._round: deque[int] = deque()
        self._round_more = False
        self._round_visible = False

    # -- lifecycle ---------------------------------------------------------

    @property
    def owned(self) -> tuple[int, ...]:
        return tuple(sorted(self.slots))

    # -- reporting -----------------------------------------------------------

    def _report(
        self, state: WorkerState | None = None, reason: str | None = None, *, rebalanced: bool = False
    ) -> None:
        """Tell the hooks where this member stands (state, members, share); every look calls it."""
        if state is not None:
            self.state = state
        if reason is not None:
            self._reason = reason
        group = self.group
        self.hooks.on_membership(
            Membership(
                projection=self.projection_name,
                total_workers=group.total_workers if group is not None else 0,
                name=self.name,
                state=self.state,
                reason=self._reason,
                members=len(self._members or ()),
                target=self._target,
                owned=self.owned,
                rebalanced=rebalanced,
            )
        )

    def _slot_state(self, slot: _Slot, state: WorkerState, reason: str) -> None:
        if (state, reason) != (slot.state, slot.reason):
            slot.state, slot.reason = state, reason
            self.hooks.on_state(slot.info, state, reason)

    # -- main loop ---------------------------------------------------------

    def run(self) -> None:
        """Process until stopped. Raises only for errors a restart cannot fix."""
        self._report(WorkerState.STARTING, "starting")
        while not self.stopping:
            conn: Connection | None = None
            try:
                conn = self._connect(
                    self.database_url,
                    application_name=membership.application_name(self.projection_name, self.name),
                    autocommit=True,
                )
                # An unmigrated database is no outage to wait out: it fails the worker.
                require_migrated(conn)
                self._serve(conn)
            except ConfigError:
                raise
            except psycopg.Error as e:
                if not (isinstance(e, psycopg.OperationalError) or connection_lost(e, conn)):
                    raise
                for slot in self.slots.values():
                    self.hooks.on_error(slot.info, "database", e)
                self._drop_all(OwnershipReason.LOST)
                delay = self.reconnect_backoff.next_delay()
                self._report(WorkerState.FAILING, f"database unavailable: {one_line(e)}")
                log.warning(
                    "elastic worker %s: database unavailable (%s); reconnecting in %.1fs (attempt %d)",
                    self.name,
                    one_line(e),
                    delay,
                    self.reconnect_backoff.attempts,
                )
                self._stop.wait(delay)
            except (FencedError, _Regroup) as e:
                for slot in self.slots.values():
                    self.hooks.on_error(slot.info, "fenced", e)
                self._drop_all(OwnershipReason.LOST)
                self._report(WorkerState.STARTING, f"joining the group again: {one_line(e)}")
                log.warning("elastic worker %s: %s; joining the group again", self.name, one_line(e))
                self._stop.wait(self.reconnect_backoff.next_delay())
            finally:
                # The member lock and every ownership lock go with the session.
                self._drop_all(OwnershipReason.LOST)
                if conn is not None:
                    _close_quietly(conn)
                self.group, self.number, self._members = None, None, None
        self._report(WorkerState.STOPPING, "stop requested")
        log.info("elastic worker %s of %s stopped", self.name, self.projection_name)

    def _serve(self, conn: Connection) -> None:
        group = self._join_group(conn)
        if group is None:
            return
        self.group = group
        total = group.total_workers
        conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(NOTIFY_CHANNEL)))
        conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(membership.MEMBERS_CHANNEL)))
        self.number = membership.join(conn, self.projection_name, total)
        membership.notify(conn, self.projection_name)
        log.info(
            "elastic worker %s joined %s (%d partitions) as member %d",
            self.name,
            self.projection_name,
            total,
            self.number,
        )
        self._warn_unindexed(conn, total)
        self._members, self._look_at, self._look_now = None, 0.0, True
        self._round.clear()
        self._round_more = self._round_visible = False
        self._own_pid = conn.info.backend_pid
        self._notified, self._fenced_retry = None, None
        self._holds_doorbell = self._doorbell_armed = False
        try:
            while not self.stopping:
                if self._look_now or time.monotonic() >= self._look_at:
                    self._look(conn)
                if self._round:
                    self._step(conn)
                    continue
                # A round is over: every owned partition ran one batch.
                if self.slots and self.reconnect_backoff.attempts:
                    log.info("elastic worker %s: processing again", self.name)
                    self.reconnect_backoff.reset()
                if self._round_more:
                    self._take_notifications(conn)
                    self._busy(conn, notified=False)
                elif not self.slots:
                    # Nothing owned (more members than partitions): wait for the next look.
                    self._wait(conn, self.options.poll_interval)
                    self._notified = None
                else:
                    if self._round_visible:
                        # New rows, ours or another partition's: more are likely on the way.
                        self._busy(conn, notified=False)
                    self._wait_for_work(conn)
                self._new_round()
        finally:
            if self.stopping and not conn.closed:
                self._leave(conn)

    def _join_group(self, conn: Connection) -> GroupConfig | None:
        """The projection's group at the partition count it has, created with ``partitions`` if none."""
        while not self.stopping:
            existing = group_partitions(conn, self.projection_name)
            total = existing or self.partitions
            try:
                joined = register_group(conn, self.projection_name, total)
            except ConfigError:
                # Another process switched the group between the two reads: read it again.
                if group_partitions(conn, self.projection_name) == total:
                    raise
                continue
            if isinstance(joined, GroupConfig):
                if existing is not None and existing != self.partitions:
                    log.info(
                        "elastic worker %s: %s has %d partitions; PARTITIONS=%d applies only to a new "
                        "group (`projectionist rescale` changes the count)",
                        self.name,
                        self.projection_name,
                        existing,
                        self.partitions,
                    )
                return joined
            self._report(WorkerState.STANDBY, "waiting for a rescale of the group to finish")
            self._stop.wait(1.0)
        return None

    def _warn_unindexed(self, conn: Connection, total: int) -> None:
        if total < 2:
            return
        reason = partition_indexes.why_not_ready(conn, total, 0)
        if reason is not None and reason != partition_indexes.NO_STATISTICS:
            log.warning(
                "elastic worker %s: the partitions read without their indexes, stepping over the other "
                "partitions' rows (%s); build them with `projectionist partition-index create "
                "--partitions %d`",
                self.name,
                reason,
                total,
            )

    # -- membership ----------------------------------------------------------

    def _look(self, conn: Connection) -> None:
        """Read the group's members and owners, and move one step towards this member's fair share.

        A member acts on a member list only once two looks in a row saw the
        same one (the second follows soon after a change), so that members
        joining or leaving at nearly the same moment do not move a partition
        twice; a member that owns nothing takes free partitions at once.
        """
        group, number = self.group, self.number
        assert group is not None and number is not None
        total = group.total_workers
        interval = self.options.rebalance_interval
        self._look_now = False
        view = membership.read_view(conn, self.projection_name, total)
        if view.total_workers != total:
            raise _Regroup(f"the group now has {view.total_workers} partitions, not {total}")
        if number not in view.members:
            raise FencedError(f"member {number} of {self.projection_name} lost its member lock")
        numbers = view.numbers
        rebalanced = numbers != self._members
        self._members = numbers
        self._look_at = time.monotonic() + (interval / 2 if rebalanced else interval)
        step = membership.plan(view, number, total, self.slots, self._rng)
        self._target = step.target
        settled = not rebalanced
        taken: list[int] = []
        if step.release and settled:
            for k in step.release:
                self._release(conn, k, OwnershipReason.REVOKED)
            # The members waiting for these partitions need not wait for their next look.
            membership.notify(conn, self.projection_name)
        if step.want and (settled or not self.slots):
            taken = membership.try_acquire_up_to(
                conn, self.projection_name, total, step.candidates, step.want
            )
            for k in taken:
                self._adopt(conn, k)
            if len(self.slots) < step.target:
                # Not there yet: a partition is still held by a member over its share.
                self._look_at = min(self._look_at, time.monotonic() + interval / 2)
        if rebalanced or taken or (step.release and settled):
            log.info(
                "elastic worker %s: %d member(s), share %d; took %s, released %s; owns %s",
                self.name,
                len(numbers),
                step.target,
                membership.ranges(tuple(sorted(taken))),
                membership.ranges(step.release if settled else ()),
                membership.ranges(self.owned),
            )
        self._report(WorkerState.LIVE, f"member {number} of {len(numbers)}", rebalanced=rebalanced)

    def _adopt(self, conn: Connection, k: int) -> None:
        group = self.group
        assert group is not None
        partition = Partition(k, group.total_workers)
        processor = Processor(
            self.projection_factory(),
            partition,
            batch_size=self.options.batch_size,
            hooks=self.hooks,
            policy=self.options.poison_policy,
            lock_fence=True,
        )
        info = WorkerInfo(self.projection_name, k, group.total_workers)
        slot = _Slot(
            info, processor, Backoff(initial=0.5, maximum=30.0, max_attempts=self.options.max_retries)
        )
        self.slots[k] = slot
        self.hooks.on_ownership(info, True, OwnershipReason.ASSIGNED)
        self.hooks.on_state(info, slot.state, slot.reason)
        if not processor.start(conn, group.layers, keep_waiting=lambda: not self.stopping):
            self._release(conn, k, OwnershipReason.STOPPED)
            return
        self._round.append(k)

    def _release(self, conn: Connection, k: int, reason: OwnershipReason) -> None:
        """Let partition ``k`` go, between two of its batches."""
        slot = self.slots.pop(k)
        slot.processor.close()
        with contextlib.suppress(ValueError):
            self._round.remove(k)
        if not membership.release(conn, self.projection_name, slot.info.total_workers, k):
            log.error("elastic worker %s: partition %s was not locked by this session", self.name, k)
        self._slot_state(slot, WorkerState.STANDBY, f"released ({reason.value})")
        self.hooks.on_ownership(slot.info, False, reason)

    def _drop_all(self, reason: OwnershipReason) -> None:
        """Forget every partition: the session that held them has ended (or is about to)."""
        for k in sorted(self.slots):
            slot = self.slots.pop(k)
            slot.processor.close()
            self._slot_state(slot, WorkerState.STANDBY, f"released ({reason.value})")
            self.hooks.on_ownership(slot.info, False, reason)
        self._round.clear()

    def _leave(self, conn: Connection) -> None:
        """Graceful stop: release every partition and the member lock at once, and say so."""
        try:
            if self._holds_doorbell:
                doorbell.leave(conn, ring=True)  # the other sleepers relied on it being held
                self._holds_doorbell = False
            conn.execute("SELECT pg_advisory_unlock_all()")
            self._drop_all(OwnershipReason.STOPPED)
            membership.notify(conn, self.projection_name)
        except psycopg.Error as e:
            log.warning("elastic worker %s: leaving the group: %s", self.name, one_line(e))

    # -- processing ----------------------------------------------------------

    def _new_round(self) -> None:
        now = time.monotonic()
        self._round = deque(k for k in sorted(self.slots) if self.slots[k].due_at <= now)
        self._round_more = self._round_visible = False

    def _step(self, conn: Connection) -> None:
        """One batch of the round's next partition."""
        k = self._round.popleft()
        slot = self.slots.get(k)
        if slot is None:
            return
        self.hooks.on_tick(slot.info)
        try:
            outcome = slot.processor.run_batch(conn, isolate=slot.isolate)
        except ProjectionError as e:
            self._projection_failed(slot, e)
            return
        except FencedError as e:
            self._fenced(conn, slot, e)
            return
        slot.isolate = False
        if slot.retry_backoff.attempts:
            log.info("elastic worker %s: partition %s recovered", self.name, slot.info.worker_id)
            slot.retry_backoff.reset()
        self._round_visible |= outcome.visible
        if outcome.more:
            self._round_more = True
            self._slot_state(slot, WorkerState.CATCHING_UP, "more events waiting")
        else:
            self._slot_state(slot, WorkerState.LIVE, "caught up")

    def _fenced(self, conn: Connection, slot: _Slot, error: FencedError) -> None:
        """The batch was refused at its commit: the checkpoint moved, or the lock is not this session's.

        An operator's ``rebuild --force`` moves checkpoints under running
        workers: then the partition is still ours, and the batch starts again
        from the reloaded checkpoint. Were the lock not this session's, the
        partition is dropped, and the next look decides afresh.
        """
        group = self.group
        assert group is not None
        k = slot.info.worker_id
        self.hooks.on_error(slot.info, "fenced", error)
        view = membership.read_view(conn, self.projection_name, group.total_workers)
        if view.owners.get(k) != conn.info.backend_pid:
            log.error("elastic worker %s: %s; this session does not hold it: dropping it", self.name, error)
            self.slots.pop(k)
            slot.processor.close()
            self._slot_state(slot, WorkerState.STANDBY, "lost its ownership lock")
            self.hooks.on_ownership(slot.info, False, OwnershipReason.LOST)
            self._look_now = True
            return
        log.error("elastic worker %s: %s; reloading the checkpoint", self.name, error)
        slot.processor.start(conn, group.layers, keep_waiting=lambda: not self.stopping)

    def _projection_failed(self, slot: _Slot, error: ProjectionError) -> None:
        """Back off this partition only; once retries run out, isolate the poison event."""
        delay = slot.retry_backoff.next_delay()
        slot.due_at = time.monotonic() + delay
        poison = isinstance(error, PoisonEventError)
        self.hooks.on_error(slot.info, "poison" if poison else "projection", error)
        self._slot_state(slot, WorkerState.FAILING, one_line(error))
        log.error(
            "elastic worker %s, partition %s: %s; retrying in %.1fs (attempt %d)",
            self.name,
            slot.info.worker_id,
            error,
            delay,
            slot.retry_backoff.attempts,
            exc_info=None if poison else error.__cause__,
        )
        if slot.retry_backoff.exhausted() and not slot.isolate:
            slot.isolate = True
            slot.processor.attempts_before_isolation = slot.retry_backoff.attempts

    # -- waiting (the one place this runtime waits for events) ----------------

    def _take_notifications(self, conn: Connection) -> None:
        """Empty psycopg's queue of notifications without waiting (a worker catching up never waits)."""
        for notification in conn.notifies(timeout=0):
            self._note(notification)

    def _note(self, notification: psycopg.Notify) -> bool:
        """Record one notification; True for new events (an append's, or a peer's relay)."""
        if notification.channel == membership.MEMBERS_CHANNEL:
            if notification.payload == self.projection_name:
                self._look_now = True
            return False
        if notification.pid == self._own_pid:
            return False  # its own ring as it left the doorbell: no news
        source = "relay" if notification.payload == doorbell.RELAY else "notify"
        if self._notified != "notify":
            self._notified = source
        return True

    def _busy(self, conn: Connection, *, notified: bool) -> None:
        """The group is busy: poll soon, and leave the doorbell so that appends stop notifying.

        As the static worker's ``_wake``: a holder woken by a NOTIFY leaves
        quietly, since every sleeper got it too; any other holder rings.
        """
        self._active_at = time.monotonic()
        self._next_look = BUSY_FIRST_LOOK
        self._fenced_retry = None
        self._doorbell_armed = False
        if self._holds_doorbell:
            doorbell.leave(conn, ring=not notified)
            self._holds_doorbell = False

    def _wait_for_work(self, conn: Connection) -> None:
        """Return when the next round is due: rows are visible, a NOTIFY came, a look or retry is due.

        The static worker's cadence (``Worker._wait_for_work``,
        docs/design/notifications.md): short looks while the group is busy,
        then asleep behind the doorbell, so appends NOTIFY only while it sleeps.
        """
        poll_interval = self.options.poll_interval
        while not self.stopping:
            if time.monotonic() - self._active_at < BUSY_WINDOW:
                right_after_rows = self._next_look == BUSY_FIRST_LOOK
                woke = self._wait(conn, self._next_look, source="busy_poll")
                if woke:
                    self._busy(conn, notified=True)
                if woke is not False:
                    return
                self._next_look = min(self._next_look * 2, BUSY_LONGEST_LOOK)
                if right_after_rows or self._peek(conn).visible:
                    return
                continue
            if not self._doorbell_armed:
                turn = doorbell.try_to_sleep(conn)
                if turn is doorbell.Turn.APPENDING:
                    # Uncommitted appends hold it: their rows come at their commit.
                    woke = self._wait(conn, BUSY_LONGEST_LOOK, source="busy_poll")
                    if woke:
                        self._busy(conn, notified=True)
                    if woke is not False or self._peek(conn).visible:
                        return
                    continue
                self._holds_doorbell = turn is doorbell.Turn.HOLDER
                self._doorbell_armed = True
            # Armed: every append that did not ring has committed, and this look sees it.
            news = self._peek(conn)
            if news.visible:
                return
            if news.hidden:
                # Committed rows behind the read fence: their appends will not NOTIFY again.
                self._fenced_retry = (
                    FENCED_RETRY_START
                    if self._fenced_retry is None
                    else min(self._fenced_retry * 2, poll_interval)
                )
                woke = self._wait(conn, self._fenced_retry, source="busy_poll")
                if woke:
                    self._busy(conn, notified=True)
                if woke is not False:
                    return
                continue
            self._fenced_retry = None
            if self._wait(conn, poll_interval, source="poll"):
                self._busy(conn, notified=True)
                return
            if not self._holds_doorbell:
                # The sleeper this one relied on may be gone: check again before sleeping on.
                self._doorbell_armed = False
            return  # the poll interval's round, or a look or a retry that came due

    def _peek(self, conn: Connection) -> doorbell.Look:
        """One statement's look past the owned partitions' checkpoints; rows it sees keep the group busy."""
        positions = [slot.processor.position for slot in self.slots.values()]
        if not positions or any(p is None for p in positions):
            return doorbell.Look(visible=True, hidden=False)
        news = doorbell.look(conn, min(p for p in positions if p is not None))
        if news.visible:
            self._active_at = time.monotonic()
        return news

    def _wait(self, conn: Connection, timeout: float, *, source: str = "poll") -> bool | None:
        """Wait for new events up to ``timeout``, counted as ``source`` if it passes.

        True when notified, False when the time ran out, None when something
        else needs the loop first: a stop, a look at the members, a retry.
        """
        if self._notified is not None:
            self._woken(self._notified)
            self._notified = None
            return True
        deadline = time.monotonic() + timeout
        while not self.stopping and not self._look_now:
            now = time.monotonic()
            until = min(deadline, self._look_at, *(s.due_at for s in self.slots.values() if s.due_at > now))
            remaining = until - now
            if remaining <= 0:
                if now >= deadline:
                    self._woken(source)
                    return False
                return None
            for notification in conn.notifies(timeout=min(_SLICE, remaining), stop_after=1):
                if self._note(notification):
                    assert self._notified is not None
                    self._woken(self._notified)
                    self._notified = None
                    return True
            for slot in self.slots.values():
                self.hooks.on_tick(slot.info)
        return None

    def _woken(self, source: str) -> None:
        for slot in self.slots.values():
            self.hooks.on_wakeup(slot.info, source)


def _close_quietly(conn: Connection) -> None:
    # The connection may already be broken; closing it cannot fail usefully.
    with contextlib.suppress(Exception):
        conn.close()
