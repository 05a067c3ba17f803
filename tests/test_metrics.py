"""Prometheus metrics: the worker hooks and the scrape-time store Collector, with exact values.

Each test builds its own CollectorRegistry. Collector tests run against the
real PostgreSQL of the session; nothing is mocked.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from psycopg_pool import ConnectionPool

from projectionist.hooks import BatchResult, HookChain, WorkerInfo, WorkerState
from projectionist.partitioning import Partition, partition_of
from projectionist.records import NewEvent, Position
from projectionist.settings import TelemetryOptions, WorkerOptions
from projectionist.store.appending import StreamAppend, append_many
from projectionist.store.connection import Connection, connect
from projectionist.telemetry import Telemetry
from projectionist.telemetry.metrics import MetricsHooks
from projectionist.telemetry.store_collector import StoreCollector
from projectionist.telemetry.tracing import TracingHooks
from projectionist.testing import wait_for
from projectionist.worker.worker import Worker
from tests.projections import PoisonSensitive, Recorder

INFO = WorkerInfo("orders", 1, 4)
LABELS = {"projection": "orders", "worker": "1", "total_workers": "4"}


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


# -- hooks (no database involved) --------------------------------------------


def test_registered_worker_starts_with_zeroed_series() -> None:
    registry = CollectorRegistry()
    hooks = MetricsHooks(registry, version="1.2.3", revision="abc123", clock=lambda: 1000.0)
    hooks.register_worker(INFO)

    assert sample(registry, "projectionist_events_processed_total", **LABELS) == 0
    assert sample(registry, "projectionist_events_skipped_total", **LABELS) == 0
    for error_type in ("database", "fenced", "projection", "poison", "parked"):
        assert sample(registry, "projectionist_errors_total", **LABELS, error_type=error_type) == 0
    for source in ("notify", "poll"):
        assert sample(registry, "projectionist_wakeups_total", **LABELS, source=source) == 0
    assert (
        sample(registry, "projectionist_worker_state", **LABELS, projectionist_worker_state="starting") == 1
    )
    assert sample(registry, "projectionist_worker_state", **LABELS, projectionist_worker_state="live") == 0
    assert sample(registry, "projectionist_partition_owned", **LABELS) == 0
    assert sample(registry, "projectionist_last_progress_timestamp_seconds", **LABELS) == 1000.0
    assert sample(registry, "projectionist_build_info", version="1.2.3", revision="abc123") == 1


def test_hooks_count_batches_errors_wakeups_and_state_exactly() -> None:
    registry = CollectorRegistry()
    now = [1000.0]
    hooks = MetricsHooks(registry, version="0.1.0", clock=lambda: now[0])

    hooks.on_ownership(INFO, True)
    hooks.on_state(INFO, WorkerState.CATCHING_UP, "connected")
    assert sample(registry, "projectionist_partition_owned", **LABELS) == 1
    now[0] = 1010.0
    hooks.after_batch(INFO, BatchResult(3, 0.02, Position(10, 30), None))
    hooks.after_batch(INFO, BatchResult(5, 0.4, Position(11, 40), None))
    # A batch that only moved the checkpoint past other partitions' rows.
    now[0] = 1020.0
    hooks.after_batch(INFO, BatchResult(0, 0.003, Position(12, 50), None))
    hooks.on_state(INFO, WorkerState.LIVE, "caught up")
    for source in ("notify", "notify", "poll", "replay"):
        hooks.on_wakeup(INFO, source)
    hooks.on_error(INFO, "projection", RuntimeError("boom"))
    hooks.on_error(INFO, "projection", RuntimeError("boom"))
    hooks.on_error(INFO, "database", OSError("gone"))
    hooks.on_error(INFO, "parked", RuntimeError("moved to the dead letters"))
    hooks.on_error(INFO, "brand-new", RuntimeError("a type added by later code"))

    assert sample(registry, "projectionist_events_processed_total", **LABELS) == 8
    assert sample(registry, "projectionist_batch_size_count", **LABELS) == 2
    assert sample(registry, "projectionist_batch_size_sum", **LABELS) == 8
    assert sample(registry, "projectionist_batch_size_bucket", **LABELS, le="5.0") == 2
    assert sample(registry, "projectionist_batch_size_bucket", **LABELS, le="2.0") == 0
    assert sample(registry, "projectionist_batch_duration_seconds_count", **LABELS) == 3
    assert sample(registry, "projectionist_batch_duration_seconds_sum", **LABELS) == pytest.approx(0.423)
    assert sample(registry, "projectionist_batch_duration_seconds_bucket", **LABELS, le="0.025") == 2
    assert sample(registry, "projectionist_batch_duration_seconds_bucket", **LABELS, le="0.5") == 3
    assert sample(registry, "projectionist_last_progress_timestamp_seconds", **LABELS) == 1020.0
    assert sample(registry, "projectionist_worker_state", **LABELS, projectionist_worker_state="live") == 1
    assert (
        sample(registry, "projectionist_worker_state", **LABELS, projectionist_worker_state="catching_up")
        == 0
    )
    assert sample(registry, "projectionist_wakeups_total", **LABELS, source="notify") == 2
    assert sample(registry, "projectionist_wakeups_total", **LABELS, source="poll") == 1
    assert sample(registry, "projectionist_wakeups_total", **LABELS, source="replay") == 1
    assert sample(registry, "projectionist_errors_total", **LABELS, error_type="projection") == 2
    assert sample(registry, "projectionist_errors_total", **LABELS, error_type="database") == 1
    assert sample(registry, "projectionist_errors_total", **LABELS, error_type="parked") == 1
    assert sample(registry, "projectionist_errors_total", **LABELS, error_type="brand-new") == 1
    assert sample(registry, "projectionist_errors_total", **LABELS, error_type="poison") == 0
    assert sample(registry, "projectionist_events_skipped_total", **LABELS) == 0

    # Ownership is the lock's, not the state's: failing on an event, a worker
    # still holds it, and nobody else can take the partition over.
    hooks.on_state(INFO, WorkerState.FAILING, "the projection raised")
    assert sample(registry, "projectionist_partition_owned", **LABELS) == 1
    hooks.on_ownership(INFO, False)
    assert sample(registry, "projectionist_partition_owned", **LABELS) == 0


def test_batch_duration_exemplar_is_the_batch_span_trace_id() -> None:
    registry = CollectorRegistry()
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    metrics = MetricsHooks(registry, version="0.1.0")
    chain = HookChain([TracingHooks(provider.get_tracer("test")), metrics])

    with chain.batch_scope(INFO, []):
        pass
    chain.after_batch(INFO, BatchResult(1, 0.007, Position(1, 1), None))
    (span,) = exporter.get_finished_spans()
    trace_id = format(span.context.trace_id, "032x")

    exemplars = [
        s.exemplar
        for family in registry.collect()
        if family.name == "projectionist_batch_duration_seconds"
        for s in family.samples
        if s.exemplar is not None
    ]
    assert len(exemplars) == 1
    assert exemplars[0].labels == {"trace_id": trace_id}
    assert exemplars[0].value == 0.007
    assert f'# {{trace_id="{trace_id}"}} 0.007' in generate_openmetrics(registry).decode()

    # Without a span there is no exemplar (and no stale one from the last batch).
    metrics.after_batch(INFO, BatchResult(1, 0.008, Position(1, 2), None))
    assert generate_openmetrics(registry).decode().count("trace_id=") == 1


def test_a_failed_batch_leaves_no_exemplar_behind() -> None:
    # A failed batch has no after_batch; the next checkpoint move without
    # events has no batch scope, and must not take the failed batch's trace id.
    registry = CollectorRegistry()
    provider = TracerProvider()
    metrics = MetricsHooks(registry, version="0.1.0")
    chain = HookChain([TracingHooks(provider.get_tracer("test")), metrics])

    with pytest.raises(RuntimeError), chain.batch_scope(INFO, []):
        raise RuntimeError("the projection failed")
    chain.after_batch(INFO, BatchResult(0, 0.002, Position(1, 5), None))
    assert "trace_id=" not in generate_openmetrics(registry).decode()
    # Failed after its scope closed: the commit or the checkpoint write.
    with chain.batch_scope(INFO, []):
        pass
    chain.on_error(INFO, "database", RuntimeError("the commit failed"))
    chain.after_batch(INFO, BatchResult(0, 0.002, Position(1, 6), None))
    assert "trace_id=" not in generate_openmetrics(registry).decode()


# -- the store Collector (real PostgreSQL) ------------------------------------


def append_events(conn: Connection, per_aggregate: dict[str, int]) -> None:
    with conn.transaction():
        append_many(
            conn,
            [
                StreamAppend(agg, [NewEvent("Tested", {"n": i}) for i in range(n)])
                for agg, n in per_aggregate.items()
            ],
        )


def catch_up(db_url: str, projection: str, partition: Partition) -> None:
    """Run a real worker for ``partition`` until it is live, then stop it."""
    worker = Worker(db_url, Recorder(projection), partition, WorkerOptions(poll_interval=0.2))
    worker.start()
    try:
        wait_for(lambda: worker.state == WorkerState.LIVE, f"worker {partition} to catch up")
    finally:
        worker.stop()
        worker.join(timeout=30)


@pytest.fixture
def metrics_pool(db_url: str) -> Iterator[ConnectionPool[Connection]]:
    pool: ConnectionPool[Connection] = ConnectionPool(
        db_url, min_size=1, max_size=2, open=True, kwargs={"autocommit": True}
    )
    pool.wait(timeout=30)
    try:
        yield pool
    finally:
        pool.close()


def db_scalar(conn: Connection, query: str, params: tuple[object, ...] = ()) -> object:
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return row[0]


@pytest.mark.integration
def test_collector_reports_every_partition_including_a_stopped_one(
    db_url: str, conn: Connection, metrics_pool: ConnectionPool[Connection]
) -> None:
    aggregates = {f"order-{i}": 1 + i % 3 for i in range(40)}
    append_events(conn, aggregates)
    # Partition 0 runs and catches up; partition 1 never started (its process is "down").
    catch_up(db_url, "orders", Partition(0, 2))
    later = {f"late-{i}": 2 for i in range(10)}
    append_events(conn, later)
    everything = {**aggregates, **later}
    # Partition 0 is behind by the late events only; partition 1 by all of its events.
    behind = {
        0: sum(n for a, n in later.items() if partition_of(a, 2) == 0),
        1: sum(n for a, n in everything.items() if partition_of(a, 2) == 1),
    }
    # A second projection in the same store, with its own group.
    catch_up(db_url, "other", Partition(0, 1))

    registry = CollectorRegistry()
    registry.register(StoreCollector(metrics_pool, ["orders"]))
    values = {
        k: {
            name: sample(
                registry, f"projectionist_{name}", projection="orders", worker=str(k), total_workers="2"
            )
            for name in ("head_position", "checkpoint_position", "lag_events", "lag_seconds")
        }
        for k in (0, 1)
    }
    oldest_unapplied_age = float(
        db_scalar(conn, "SELECT extract(epoch FROM clock_timestamp() - min(created_at))::float8 FROM events")  # type: ignore[arg-type]
    )
    checkpoint_0 = db_scalar(
        conn,
        "SELECT last_global_position FROM projection_checkpoints "
        "WHERE projection_name = 'orders' AND total_workers = 2 AND worker_id = 0",
    )
    head = sum(everything.values())

    assert values[0]["head_position"] == values[1]["head_position"] == head
    assert values[0]["checkpoint_position"] == checkpoint_0
    assert values[1]["checkpoint_position"] == 0
    assert values[0]["lag_events"] == behind[0] > 0
    assert values[1]["lag_events"] == behind[1] > 0
    # Partition 1 never applied anything: its lag is the age of the very first event.
    assert 0 < values[1]["lag_seconds"] <= oldest_unapplied_age  # type: ignore[operator]

    # Partition 0 catches up again: lag and lag seconds return to exactly 0.
    catch_up(db_url, "orders", Partition(0, 2))
    assert (
        sample(registry, "projectionist_lag_events", projection="orders", worker="0", total_workers="2") == 0
    )
    assert (
        sample(registry, "projectionist_lag_seconds", projection="orders", worker="0", total_workers="2") == 0
    )
    # Another projection's group is not this collector's business.
    assert (
        sample(registry, "projectionist_lag_events", projection="other", worker="0", total_workers="1")
        is None
    )


@pytest.mark.integration
def test_lag_count_is_capped(db_url: str, conn: Connection, metrics_pool: ConnectionPool[Connection]) -> None:
    append_events(conn, {"a": 1})
    catch_up(db_url, "capped", Partition(0, 1))
    append_events(conn, {"a": 7, "b": 5})
    registry = CollectorRegistry()
    registry.register(StoreCollector(metrics_pool, ["capped"], lag_count_cap=5))
    labels = {"projection": "capped", "worker": "0", "total_workers": "1"}
    assert sample(registry, "projectionist_lag_events", **labels) == 5
    assert sample(registry, "projectionist_head_position", **labels) == 13

    uncapped = CollectorRegistry()
    uncapped.register(StoreCollector(metrics_pool, ["capped"], lag_count_cap=1000))
    assert sample(uncapped, "projectionist_lag_events", **labels) == 12


@pytest.mark.integration
def test_oldest_transaction_age_sees_an_open_writer(
    db_url: str, metrics_pool: ConnectionPool[Connection]
) -> None:
    registry = CollectorRegistry()
    registry.register(StoreCollector(metrics_pool, []))
    with connect(db_url) as holder, connect(db_url, autocommit=True) as observer:
        holder.execute("SELECT pg_current_xact_id()")  # takes a transaction id, like a writer
        pid = holder.info.backend_pid
        age_before = float(
            db_scalar(  # type: ignore[arg-type]
                observer,
                "SELECT extract(epoch FROM clock_timestamp() - xact_start)::float8 "
                "FROM pg_stat_activity WHERE pid = %s",
                (pid,),
            )
        )
        reported = sample(registry, "projectionist_oldest_transaction_age_seconds")
        assert reported is not None
        # At least as old as ours (the oldest in the cluster may be older still).
        assert reported >= age_before > 0
        holder.rollback()


@pytest.mark.integration
def test_pool_stats_are_exported(metrics_pool: ConnectionPool[Connection]) -> None:
    registry = CollectorRegistry()
    registry.register(StoreCollector(metrics_pool, []))
    assert sample(registry, "projectionist_db_pool_size") == 1
    assert sample(registry, "projectionist_db_pool_available") == 1
    assert sample(registry, "projectionist_db_pool_requests_waiting") == 0
    assert sample(registry, "projectionist_db_pool_max") == 2


def test_unreachable_database_drops_store_series_but_keeps_pool_stats(unused_db_url: str) -> None:
    pool: ConnectionPool[Connection] = ConnectionPool(
        unused_db_url, min_size=1, max_size=1, open=True, kwargs={"connect_timeout": 1}
    )
    try:
        registry = CollectorRegistry()
        registry.register(StoreCollector(pool, ["orders"], timeout=0.5))
        names = {family.name for family in registry.collect() if family.samples}
        assert names == {
            "projectionist_db_pool_size",
            "projectionist_db_pool_available",
            "projectionist_db_pool_requests_waiting",
            "projectionist_db_pool_max",
        }
        # pool_size counts connections being attempted too; none is available.
        assert sample(registry, "projectionist_db_pool_available") == 0
        assert sample(registry, "projectionist_db_pool_max") == 1
    finally:
        pool.close(timeout=1)


@pytest.fixture
def unused_db_url() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Nothing listens there once the socket is closed.
    return f"postgresql://postgres@127.0.0.1:{port}/nowhere"


# -- end to end in one process ------------------------------------------------


@pytest.mark.integration
def test_instrumented_workers_count_every_event_once(db_url: str, conn: Connection) -> None:
    registry = CollectorRegistry()
    telemetry = Telemetry(db_url, ["recorder"], TelemetryOptions(metrics_port=0), registry=registry)
    hooks = telemetry.hook_chain()
    workers = [
        Worker(db_url, Recorder(), Partition(k, 2), WorkerOptions(poll_interval=0.2), hooks=hooks)
        for k in (0, 1)
    ]
    for worker in workers:
        telemetry.register(worker.info)
    aggregates = {f"agg-{uuid.uuid4().hex[:6]}": 3 for _ in range(30)}
    with telemetry:
        for worker in workers:
            worker.start()
        try:
            append_events(conn, aggregates)
            total = sum(aggregates.values())

            def processed() -> float:
                return sum(
                    sample(
                        registry,
                        "projectionist_events_processed_total",
                        projection="recorder",
                        worker=str(k),
                        total_workers="2",
                    )
                    or 0
                    for k in (0, 1)
                )

            wait_for(lambda: processed() == total, "every event to be counted")
            wait_for(lambda: all(w.state == WorkerState.LIVE for w in workers), "both workers live")
            for k in (0, 1):
                labels = {"projection": "recorder", "worker": str(k), "total_workers": "2"}
                mine = sum(n for a, n in aggregates.items() if partition_of(a, 2) == k)
                assert sample(registry, "projectionist_events_processed_total", **labels) == mine
                assert sample(registry, "projectionist_batch_size_sum", **labels) == mine
                assert sample(registry, "projectionist_partition_owned", **labels) == 1
                assert (
                    sample(
                        registry, "projectionist_worker_state", **labels, projectionist_worker_state="live"
                    )
                    == 1
                )
                assert sample(registry, "projectionist_lag_events", **labels) == 0
                assert sample(registry, "projectionist_lag_seconds", **labels) == 0
                assert sample(registry, "projectionist_head_position", **labels) == total
                last = sample(registry, "projectionist_last_progress_timestamp_seconds", **labels)
                assert last is not None and last <= datetime.now(UTC).timestamp()
            assert processed() == total
        finally:
            for worker in workers:
                worker.stop()
            for worker in workers:
                worker.join(timeout=30)
    for k in (0, 1):
        labels = {"projection": "recorder", "worker": str(k), "total_workers": "2"}
        assert (
            sample(registry, "projectionist_worker_state", **labels, projectionist_worker_state="stopping")
            == 1
        )
        assert sample(registry, "projectionist_partition_owned", **labels) == 0


def test_telemetry_without_a_port_or_endpoint_adds_no_hooks() -> None:
    telemetry = Telemetry("postgresql://unused", ["x"], TelemetryOptions())
    assert telemetry.hooks == []
    assert telemetry.registry is None
    assert len(telemetry.hook_chain().hooks) == 1  # logging only
    with telemetry:  # nothing to start, nothing to close
        assert telemetry.server is None


# projectionist_partition_owned follows the lock, not the state: a worker stuck
# on a poison event (POISON_POLICY=stop) still holds it, and must not report 0
# and have ProjectionistPartitionUncovered page "no process holds the lock".
@pytest.mark.integration
def test_a_worker_failing_on_an_event_still_reports_its_ownership(db_url: str, conn: Connection) -> None:
    append_events(conn, {"a": 1})
    conn.execute("""UPDATE events SET payload = '{"poison": true}'""")
    registry = CollectorRegistry()
    labels = {"projection": "poison_sensitive", "worker": "0", "total_workers": "1"}
    worker = Worker(
        db_url,
        PoisonSensitive(),
        Partition(0, 1),
        WorkerOptions(poll_interval=0.2),
        hooks=MetricsHooks(registry, version="t"),
    )
    worker.retry_backoff.initial = worker.retry_backoff.maximum = 0.05
    worker.start()
    try:
        wait_for(lambda: worker.state == WorkerState.FAILING, "the worker to fail on the event")
        assert sample(registry, "projectionist_partition_owned", **labels) == 1
        held = db_scalar(
            conn,
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND database = "
            "(SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        assert held == 1
    finally:
        worker.stop()
        worker.join(timeout=30)
    assert sample(registry, "projectionist_partition_owned", **labels) == 0
