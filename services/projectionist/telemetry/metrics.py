"""Prometheus metrics: hooks for what the worker loop does, a Collector for what the store says when scraped.

Two sources, on purpose:

* :class:`MetricsHooks` counts what happens inside this process (events
  applied, batches, errors, wake-ups, state). Those series carry the labels
  ``projection``, ``worker`` (the partition) and ``total_workers``.
* :class:`StoreCollector` asks PostgreSQL, when Prometheus scrapes, where the
  store's head is and how far behind **every partition of the projection's
  group** is, like kafka-lag-exporter reports every partition of a consumer
  group. A stopped worker exports nothing itself, so its lag has to come from
  its siblings: every running process reports every partition, and dashboards
  and alerts aggregate with ``max by (projection, worker)``.

The library never reads the environment here; :mod:`projectionist.telemetry._telemetry`
builds these objects from the settings.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from opentelemetry import trace
from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from psycopg_pool import ConnectionPool, PoolTimeout

from projectionist.consume import dead_letters
from projectionist.consume.lag import StoreLag, read_lag
from projectionist.errors import one_line
from projectionist.hooks import BatchResult, WorkerHooks, WorkerInfo, WorkerState
from projectionist.records import RecordedEvent

log = logging.getLogger(__name__)

#: Labels of every per-worker series. Bounded: never an aggregate or event id.
WORKER_LABELS = ("projection", "worker", "total_workers")

#: Error types and wake-up sources the worker reports; their series start at 0.
#: Both come from code, never from data, so a new one may appear lazily.
ERROR_TYPES = ("database", "fenced", "projection", "poison", "parked")
WAKEUP_SOURCES = ("notify", "poll")
WORKER_STATES = [state.value for state in WorkerState]

# Seconds. A batch is usually milliseconds; a slow projection may take seconds.
BATCH_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Events per batch; the default batch size is 500.
BATCH_SIZE_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)

#: Default bound on the rows one scrape counts per partition (see :class:`StoreCollector`).
DEFAULT_LAG_COUNT_CAP = 10_000


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
            "What woke the idle worker: a NOTIFY from an append, or the poll timer.",
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

    def on_ownership(self, info: WorkerInfo, owned: bool) -> None:
        self._for(info).owned.set(1 if owned else 0)

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
        # after_batch runs only when the checkpoint moved (past our events or
        # past other partitions' rows): either way the worker made progress.
        series.last_progress.set(self._clock())

    def on_error(self, info: WorkerInfo, error_type: str, error: BaseException) -> None:
        # A batch that failed after its scope closed (its commit, its
        # checkpoint) gets no after_batch either: its trace id must not
        # become the exemplar of the next checkpoint move.
        self._exemplar.pop(info, None)
        series = self._for(info)
        counter = series.errors.get(error_type)
        if counter is None:
            counter = series.errors[error_type] = self.errors.labels(*worker_labels(info), error_type)
        counter.inc()


@dataclass(frozen=True, slots=True)
class StoreSnapshot:
    """What one scrape read from the store."""

    lag: StoreLag
    #: Per projection: open dead letters and the age of the oldest (POISON_POLICY=park).
    parked: dict[str, tuple[int, float]]


def read_store_snapshot(
    conn: psycopg.Connection[Any], projections: Sequence[str], lag_count_cap: int
) -> StoreSnapshot:
    # One snapshot for the three statements: a rescale committed between the
    # group query and the lag query was read half before and half after, the
    # new count's labels on the old count's partitions.
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        return StoreSnapshot(
            read_lag(conn, projections, lag_count_cap), dead_letters.stats(conn, projections)
        )


class StoreCollector(Collector):
    """Scrape-time metrics from PostgreSQL, through a small connection pool of its own.

    Reports head position, checkpoint position, lag in events and in seconds
    for every partition of ``projections``' groups, the cluster's oldest
    transaction age, and the pool's own stats. When the database cannot be
    reached, only the pool stats are reported (the series go missing rather
    than lie), and the workers' ``errors_total{error_type="database"}`` rises.

    ``lag_count_cap`` bounds the work one scrape does per partition (see
    lag.py): through the partition's index it reads at most that many of the
    partition's entries, so ``projectionist_lag_events`` is exact up to the
    cap; without, a window of ``lag_count_cap * total_workers`` entries of
    the main index, exact up to roughly the cap and a lower bound beyond.
    """

    def __init__(
        self,
        pool: ConnectionPool[Any],
        projections: Sequence[str],
        *,
        lag_count_cap: int = DEFAULT_LAG_COUNT_CAP,
        timeout: float = 2.0,
    ) -> None:
        if lag_count_cap < 1:
            raise ValueError("lag_count_cap must be at least 1")
        self.pool = pool
        self.projections = list(projections)
        self.lag_count_cap = lag_count_cap
        self.timeout = timeout

    def describe(self) -> Iterator[Metric]:
        # Names only: registering must not query the database, and describing
        # lets the registry reject a clash with another collector's names.
        yield from self._families(None)

    def collect(self) -> Iterator[Metric]:
        snapshot: StoreSnapshot | None = None
        try:
            with self.pool.connection(timeout=self.timeout) as conn:
                snapshot = read_store_snapshot(conn, self.projections, self.lag_count_cap)
        except (psycopg.Error, PoolTimeout) as e:
            log.warning("metrics: cannot read lag from the database: %s", one_line(e))
        yield from self._families(snapshot)

    def _families(self, snapshot: StoreSnapshot | None) -> Iterator[Metric]:
        labels = list(WORKER_LABELS)
        head = GaugeMetricFamily(
            "projectionist_head_position",
            "The store's highest global position (same for every partition).",
            labels=labels,
        )
        checkpoint = GaugeMetricFamily(
            "projectionist_checkpoint_position",
            "Global position of the partition's checkpoint, read from the database.",
            labels=labels,
        )
        lag_events = GaugeMetricFamily(
            "projectionist_lag_events",
            "The partition's events after its checkpoint (exact up to the lag count cap).",
            labels=labels,
        )
        lag_seconds = GaugeMetricFamily(
            "projectionist_lag_seconds",
            "Age of the partition's oldest unapplied event; 0 when caught up.",
            labels=labels,
        )
        oldest = GaugeMetricFamily(
            "projectionist_oldest_transaction_age_seconds",
            "Age of the cluster's oldest transaction holding a transaction id: it holds back "
            "every gap-safe reader.",
        )
        parked = GaugeMetricFamily(
            "projectionist_parked_events",
            "Open dead letters: events parked by POISON_POLICY=park, including those blocked behind them.",
            labels=["projection"],
        )
        parked_age = GaugeMetricFamily(
            "projectionist_oldest_parked_event_age_seconds",
            "Age of the oldest open dead letter; 0 when there is none.",
            labels=["projection"],
        )
        if snapshot is not None:
            for name, (count, age) in snapshot.parked.items():
                parked.add_metric([name], count)
                parked_age.add_metric([name], age)
            for p in snapshot.lag.partitions:
                values = [p.projection, str(p.worker_id), str(p.total_workers)]
                head.add_metric(values, snapshot.lag.head_position)
                checkpoint.add_metric(values, p.checkpoint_position)
                lag_events.add_metric(values, p.lag_events)
                lag_seconds.add_metric(values, p.lag_seconds)
            oldest.add_metric([], snapshot.lag.oldest_transaction_age_seconds)
        yield from (head, checkpoint, lag_events, lag_seconds, oldest, parked, parked_age)
        yield from self._pool_families()

    def _pool_families(self) -> Iterator[Metric]:
        stats = self.pool.get_stats()
        for name, key, help_text in (
            ("projectionist_db_pool_size", "pool_size", "Connections open in the metrics pool."),
            ("projectionist_db_pool_available", "pool_available", "Idle connections in the metrics pool."),
            (
                "projectionist_db_pool_requests_waiting",
                "requests_waiting",
                "Requests waiting for a connection of the metrics pool.",
            ),
            ("projectionist_db_pool_max", "pool_max", "Maximum size of the metrics pool."),
        ):
            family = GaugeMetricFamily(name, help_text)
            family.add_metric([], stats.get(key, 0))
            yield family
