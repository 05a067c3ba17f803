"""The lag Collector: at each scrape, where the store's head is and how far behind every partition is.

Every running process reports every partition of its projections' groups, so
a stopped worker's lag still shows; dashboards and alerts take the ``max``.
How lag is counted cheaply: ``docs/design/lag.md``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from psycopg_pool import ConnectionPool, PoolTimeout

from projectionist.consume import dead_letters
from projectionist.consume.lag import StoreLag, read_lag
from projectionist.errors import one_line
from projectionist.telemetry.metrics import WORKER_LABELS

log = logging.getLogger(__name__)

#: Default bound on the rows one scrape counts per partition (see :class:`StoreCollector`).
DEFAULT_LAG_COUNT_CAP = 10_000


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
