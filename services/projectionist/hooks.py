"""The seam between the processing loop and whatever watches it (metrics, traces, the demo).

Modelled on dramatiq's middleware: a base class whose methods do nothing, and
an emitter that calls every hook and logs, rather than propagates, a hook's
failure, because a broken exporter must never stop event processing.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from projectionist.records import Position, RecordedEvent

log = logging.getLogger(__name__)


class WorkerState(StrEnum):
    STARTING = "starting"
    STANDBY = "standby"
    CATCHING_UP = "catching_up"
    LIVE = "live"
    STOPPING = "stopping"
    FAILING = "failing"


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    projection: str
    worker_id: int
    total_workers: int


class OwnershipReason(StrEnum):
    """Why a process took or let go of a partition (``on_ownership``)."""

    #: A static worker took its partition's lock (at start, or as a standby taking over).
    ACQUIRED = "acquired"
    #: An elastic member took a free partition towards its fair share.
    ASSIGNED = "assigned"
    #: An elastic member released a partition above its fair share, for another member.
    REVOKED = "revoked"
    #: Released on a graceful stop (SIGTERM), between batches.
    STOPPED = "stopped"
    #: The session ended (connection lost, database restart): the server released the lock.
    LOST = "lost"


@dataclass(frozen=True, slots=True)
class Membership:
    """An elastic worker's view of its group, reported at every rebalance tick (``on_membership``)."""

    projection: str
    #: The group's partition count; 0 until the worker has joined it.
    total_workers: int
    #: This member's name (pod or host name), as ``projectionist status`` shows it.
    name: str
    state: WorkerState
    reason: str
    #: Members of the group this worker sees, itself included (0 while not a member).
    members: int = 0
    #: Its fair share of the partitions.
    target: int = 0
    owned: tuple[int, ...] = ()
    #: The member list changed since the previous report: a rebalance.
    rebalanced: bool = False


@dataclass(frozen=True, slots=True)
class BatchResult:
    events: int
    duration_seconds: float
    checkpoint: Position
    last_event: RecordedEvent | None
    #: The events applied and committed (parked ones are not), in read order.
    applied: Sequence[RecordedEvent] = ()
    #: The database's clock just before the batch committed; with each event's
    #: ``created_at`` (the same clock, at append) it gives the append-to-apply delay.
    applied_at: datetime | None = None


class WorkerHooks:
    """Override what you need; every method defaults to a no-op."""

    def on_state(self, info: WorkerInfo, state: WorkerState, reason: str) -> None: ...

    def on_tick(self, info: WorkerInfo) -> None:
        """The loop is alive (called every iteration, busy or idle)."""

    def on_ownership(self, info: WorkerInfo, owned: bool, reason: str = "") -> None:
        """The process took (``True``) or let go of (``False``) the partition's ownership lock.

        Not a state: a worker that keeps failing on a poison event still holds
        the lock, and no other process can take the partition over. ``reason``
        is an :class:`OwnershipReason` value.
        """

    def on_membership(self, membership: Membership) -> None:
        """An elastic worker's view of its group, at every rebalance tick (about twice a second)."""

    def on_wakeup(self, info: WorkerInfo, source: str) -> None:
        """``source`` is ``notify`` (an append's), ``relay`` (a peer's), ``poll`` or ``busy_poll``."""

    @contextlib.contextmanager
    def batch_scope(self, info: WorkerInfo, events: Sequence[RecordedEvent]) -> Iterator[None]:
        """Wraps applying one batch (a span goes here)."""
        yield

    def after_batch(self, info: WorkerInfo, result: BatchResult) -> None: ...

    def on_error(self, info: WorkerInfo, error_type: str, error: BaseException) -> None: ...

    def on_read_path(self, info: WorkerInfo, indexed: bool, reason: str | None) -> None:
        """After each check of the partition's index (at start, then every 30 s).

        ``indexed`` says the reads visit only this partition's rows: through
        its own index, or with one partition, through the main one. ``reason``
        says why not, when they do not.
        """


class HookChain(WorkerHooks):
    """Calls each hook in turn; a hook that raises is logged and skipped."""

    def __init__(self, hooks: Sequence[WorkerHooks] = ()) -> None:
        # A tuple: the per-step subsets below are derived from it once.
        self.hooks = tuple(hooks)
        # Per batch, only the hooks that override the step are called: each
        # generator-based scope costs a few microseconds to enter and leave,
        # and telemetry must cost a worker little (the benchmark's telemetry workload).
        self._scoped = [h for h in self.hooks if type(h).batch_scope is not WorkerHooks.batch_scope]
        self._after = [h for h in self.hooks if type(h).after_batch is not WorkerHooks.after_batch]

    def _each(self, hooks: Sequence[WorkerHooks], method: str, *args: object) -> None:
        for hook in hooks:
            try:
                getattr(hook, method)(*args)
            except Exception:
                log.exception("hook %s.%s failed", type(hook).__name__, method)

    def on_state(self, info: WorkerInfo, state: WorkerState, reason: str) -> None:
        self._each(self.hooks, "on_state", info, state, reason)

    def on_tick(self, info: WorkerInfo) -> None:
        self._each(self.hooks, "on_tick", info)

    def on_ownership(self, info: WorkerInfo, owned: bool, reason: str = "") -> None:
        self._each(self.hooks, "on_ownership", info, owned, reason)

    def on_membership(self, membership: Membership) -> None:
        self._each(self.hooks, "on_membership", membership)

    def on_wakeup(self, info: WorkerInfo, source: str) -> None:
        self._each(self.hooks, "on_wakeup", info, source)

    @contextlib.contextmanager
    def batch_scope(self, info: WorkerInfo, events: Sequence[RecordedEvent]) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for hook in self._scoped:
                try:
                    stack.enter_context(_Guarded(hook, hook.batch_scope(info, events)))
                except Exception:
                    log.exception("hook %s.batch_scope failed", type(hook).__name__)
            yield

    def after_batch(self, info: WorkerInfo, result: BatchResult) -> None:
        self._each(self._after, "after_batch", info, result)

    def on_error(self, info: WorkerInfo, error_type: str, error: BaseException) -> None:
        self._each(self.hooks, "on_error", info, error_type, error)

    def on_read_path(self, info: WorkerInfo, indexed: bool, reason: str | None) -> None:
        self._each(self.hooks, "on_read_path", info, indexed, reason)


class _Guarded:
    """A hook's batch scope whose failure on exit is logged, and which cannot swallow the batch's error."""

    def __init__(self, hook: WorkerHooks, scope: contextlib.AbstractContextManager[object]) -> None:
        self.hook = hook
        self.scope = scope

    def __enter__(self) -> object:
        return self.scope.__enter__()

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        try:
            self.scope.__exit__(exc_type, exc, tb)  # type: ignore[arg-type]
        except Exception as e:
            if e is not exc:
                log.exception("hook %s.batch_scope failed", type(self.hook).__name__)
        # Returns None: a hook never suppresses the batch's own exception.
