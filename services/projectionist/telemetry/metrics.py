"""Prometheus metrics of what happens inside this process: events applied, batches, errors, wake-ups, state.

The series carry the labels ``projection``, ``worker`` (the partition) and
``total_workers``. What the store says (head, lag) comes from
:mod:`projectionist.telemetry.store_collector`, at scrape time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace
from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram, Info

from projectionist.errors import PoisonEventError
from projectionist.hooks import BatchResult, Membership, OwnershipReason, WorkerHooks, WorkerInfo, WorkerState
from projectionist.records import RecordedEvent
from projectionist.telemetry.freshness import ApplyDelay, ApplyDelayHistogram

log = logging.getLogger(__name__)

#: Labels of every per-worker series. Bounded: never an aggregate or event id.
WORKER_LABELS = ("projection", "worker", "total_workers")

#: Error types and wake-up sources the worker reports; their series start at 0.
#: Both come from code, never from data, so a new one may appear lazily.
ERROR_TYPES = ("database", "fenced", "projection", "poison", "parked")
WAKEUP_SOURCES = ("notify", "relay", "poll", "busy_poll")
WORKER_STATES = [state.value for state in WorkerState]

# Seconds. A batch is usually milliseconds; a slow projection may take seconds.
BATCH_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Events per batch; the default batch size is 500.
BATCH_SIZE_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)


def worker_labels(info: WorkerInfo) -> tuple[str, str, str]:
    return info.projection, str(info.worker_id), str(info.total_workers)


@dataclass(frozen=True, slots=True)
class _WorkerSeries:
    """One worker's labelled children, resolved once so a batch does no label lookups."""

    processed: Any
    skipped: Any
    batch_duration: Any
    batch_size: Any
    last_progress: Any
    state: Any
    owned: Any
    apply_delay: ApplyDelay
    poison_position: Any
    errors: dict[str, Any]
    wakeups: dict[str, Any]


class MetricsHooks(WorkerHooks):
    """Worker hooks that update Prometheus metrics in ``registry``.

    Put it *after* :class:`projectionist.telemetry.tracing.TracingHooks` in a
    :class:`~projectionist.hooks.HookChain`: the batch span is then current
    when :meth:`batch_scope` runs, and its trace id becomes the exemplar of
    ``projectionist_batch_duration_seconds``.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        version: str,
        revision: str = "unknown",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._series: dict[WorkerInfo, _WorkerSeries] = {}
        self._exemplar: dict[WorkerInfo, str] = {}
        labels = WORKER_LABELS
        self.events_processed = Counter(
            "projectionist_events_processed",
            "Events applied to the projection and committed with the checkpoint.",
            labels,
            registry=registry,
        )
        self.events_skipped = Counter(
            "projectionist_events_skipped",
            "Events outside this worker's partition that reached the worker. The partition filter "
            "runs in SQL, so this stays 0.",
            labels,
            registry=registry,
        )
        self.batch_duration = Histogram(
            "projectionist_batch_duration_seconds",
            "Time per batch: read, apply and checkpoint, in one transaction.",
            labels,
            buckets=BATCH_DURATION_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "projectionist_batch_size",
            "Events of this partition per applied batch.",
            labels,
            buckets=BATCH_SIZE_BUCKETS,
            registry=registry,
        )
        self.errors = Counter(
            "projectionist_errors",
            "Failures by kind: database (connection lost), fenced (another owner moved the "
            "checkpoint), projection (the handler raised; the batch is retried), poison (one event "
            "keeps failing), parked (an event was moved to the dead letters).",
            (*labels, "error_type"),
            registry=registry,
        )
        self.last_progress = Gauge(
            "projectionist_last_progress_timestamp_seconds",
            "Unix time the worker last moved its checkpoint (its start time until then).",
            labels,
            registry=registry,
        )
        self.state = Enum(
            "projectionist_worker_state",
            "The worker's state.",
            labels,
            states=WORKER_STATES,
            registry=registry,
        )
        self.wakeups = Counter(
            "projectionist_wakeups",
            "What made the caught-up worker look for new events: notify (an append's NOTIFY woke it; "
            "appends send one only while a worker sleeps), relay (a worker that found new rows woke "
            "it), poll (the poll interval of a sleeping worker), busy_poll (a short look while new "
            "rows are expected).",
            (*labels, "source"),
            registry=registry,
        )
        self.partition_owned = Gauge(
            "projectionist_partition_owned",
            "1 while this process holds the partition's ownership lock, failing on an event included; "
            "else 0 (standby, starting, disconnected, stopped).",
            labels,
            registry=registry,
        )
        self.partition_index_used = Gauge(
            "projectionist_partition_index_used",
            "1 while the worker's reads visit only its partition's rows (through the partition's own "
            "index, or with one partition, the main one); 0 while they step over the other partitions' "
            "rows because the index is missing, invalid or the table has no statistics yet.",
            labels,
            registry=registry,
        )
        self.apply_delay = ApplyDelayHistogram(
            "projectionist_apply_delay_seconds",
            "Time from an event's append to the commit of the batch that applied it, both read on the "
            "database's clock: the freshness objective's indicator.",
            labels,
            registry=registry,
        )
        self.poison_position = Gauge(
            "projectionist_poison_event_position",
            "Global position of the event the worker keeps failing on and will not move past "
            "(POISON_POLICY=stop); 0 when there is none.",
            labels,
            registry=registry,
        )
        # Elastic mode (worker/elastic.py): one series per process and projection, no partition label.
        self.partitions_owned = Gauge(
            "projectionist_partitions_owned",
            "Partitions this elastic worker process owns now.",
            ("projection", "total_workers"),
            registry=registry,
        )
        self.partitions_target = Gauge(
            "projectionist_partitions_target",
            "This elastic worker's fair share of the partitions (owned differs while partitions move).",
            ("projection", "total_workers"),
            registry=registry,
        )
        self.group_members = Gauge(
            "projectionist_group_members",
            "Elastic members of the projection's group that this process sees, itself included.",
            ("projection", "total_workers"),
            registry=registry,
        )
        self.rebalances = Counter(
            "projectionist_rebalances",
            "Changes of the group's member list this elastic worker saw (a join or a leave).",
            ("projection",),
            registry=registry,
        )
        self.ownership_changes = Counter(
            "projectionist_ownership_changes",
            "Partitions this process took (acquired: a static worker; assigned: an elastic member's fair "
            "share) or let go of (revoked: above its share; stopped: graceful stop; lost: the session "
            "ended).",
            ("projection", "reason"),
            registry=registry,
        )
        build = Info("projectionist_build", "The running projectionist build.", registry=registry)
        build.info({"version": version, "revision": revision})

    # -- series ------------------------------------------------------------

    def register_worker(self, info: WorkerInfo) -> None:
        """Create the worker's series at 0, so ``rate()`` and alerts see them from the start."""
        self._for(info)

    def _for(self, info: WorkerInfo) -> _WorkerSeries:
        series = self._series.get(info)
        if series is not None:
            return series
        with self._lock:
            series = self._series.get(info)
            if series is None:
                labels = worker_labels(info)
                series = _WorkerSeries(
                    processed=self.events_processed.labels(*labels),
                    skipped=self.events_skipped.labels(*labels),
                    batch_duration=self.batch_duration.labels(*labels),
                    batch_size=self.batch_size.labels(*labels),
                    last_progress=self.last_progress.labels(*labels),
                    state=self.state.labels(*labels),
                    owned=self.partition_owned.labels(*labels),
                    apply_delay=self.apply_delay.labels(*labels),
                    poison_position=self.poison_position.labels(*labels),
                    errors={t: self.errors.labels(*labels, t) for t in ERROR_TYPES},
                    wakeups={s: self.wakeups.labels(*labels, s) for s in WAKEUP_SOURCES},
                )
                series.last_progress.set(self._clock())
                self._series[info] = series
        return series

    # -- hooks -------------------------------------------------------------

    def on_state(self, info: WorkerInfo, state: WorkerState, reason: str) -> None:
        series = self._for(info)
        series.state.state(state.value)

    def on_ownership(self, info: WorkerInfo, owned: bool, reason: str = "") -> None:
        self._for(info).owned.set(1 if owned else 0)
        if reason:
            self.ownership_changes.labels(info.projection, reason).inc()

    def on_membership(self, membership: Membership) -> None:
        if membership.total_workers == 0:
            # Not a member yet: the reason counters exist from the start, at 0.
            for reason in OwnershipReason:
                self.ownership_changes.labels(membership.projection, reason.value)
            self.rebalances.labels(membership.projection)
            return
        labels = (membership.projection, str(membership.total_workers))
        self.partitions_owned.labels(*labels).set(len(membership.owned))
        self.partitions_target.labels(*labels).set(membership.target)
        self.group_members.labels(*labels).set(membership.members)
        if membership.rebalanced:
            self.rebalances.labels(membership.projection).inc()

    def on_read_path(self, info: WorkerInfo, indexed: bool, reason: str | None) -> None:
        # Created here, not with the worker's other series: until the first
        # check nobody knows, and a 0 would look like a missing index.
        self.partition_index_used.labels(*worker_labels(info)).set(1 if indexed else 0)

    def on_wakeup(self, info: WorkerInfo, source: str) -> None:
        series = self._for(info)
        counter = series.wakeups.get(source)
        if counter is None:
            counter = series.wakeups[source] = self.wakeups.labels(*worker_labels(info), source)
        counter.inc()

    @contextmanager
    def batch_scope(self, info: WorkerInfo, events: Sequence[RecordedEvent]) -> Iterator[None]:
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid and span_context.trace_flags.sampled:
            self._exemplar[info] = format(span_context.trace_id, "032x")
        else:
            self._exemplar.pop(info, None)
        try:
            yield
        except BaseException:
            # No after_batch follows a failed batch, but one may follow a
            # checkpoint move with no events and no scope of its own.
            self._exemplar.pop(info, None)
            raise

    def after_batch(self, info: WorkerInfo, result: BatchResult) -> None:
        series = self._for(info)
        trace_id = self._exemplar.pop(info, None)
        series.batch_duration.observe(
            result.duration_seconds, exemplar={"trace_id": trace_id} if trace_id else None
        )
        if result.events:
            series.processed.inc(result.events)
            series.batch_size.observe(result.events)
        if result.applied and result.applied_at is not None:
            series.apply_delay.observe_batch(result.applied_at, result.applied, trace_id)
        # Past the event it failed on (after a fix), or a batch before it.
        series.poison_position.set(0)
        # after_batch runs only when the checkpoint moved (past our events or
        # past other partitions' rows): either way the worker made progress.
        series.last_progress.set(self._clock())

    def on_error(self, info: WorkerInfo, error_type: str, error: BaseException) -> None:
        # A batch that failed after its scope closed (its commit, its
        # checkpoint) gets no after_batch either: its trace id must not
        # become the exemplar of the next checkpoint move.
        self._exemplar.pop(info, None)
        series = self._for(info)
        if isinstance(error, PoisonEventError):
            position = getattr(error.event, "global_position", None)
            if isinstance(position, int):
                series.poison_position.set(position)
        counter = series.errors.get(error_type)
        if counter is None:
            counter = series.errors[error_type] = self.errors.labels(*worker_labels(info), error_type)
        counter.inc()
