"""The append-to-apply delay histogram, and the position a stopped worker fails on, with exact values.

The histogram counts a whole batch at once; these tests pin its buckets, sum
and exemplars to what one ``observe`` per event would give. The end-to-end
test runs a real batch against the session's PostgreSQL: both ends of the
delay come from the database's clock.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from projectionist.consume.processor import Processor
from projectionist.errors import PoisonEventError
from projectionist.hooks import BatchResult, HookChain, WorkerHooks, WorkerInfo
from projectionist.partitioning import Partition
from projectionist.records import NewEvent, Position, RecordedEvent
from projectionist.settings import PoisonPolicy
from projectionist.store.appending import append
from projectionist.store.connection import Connection
from projectionist.telemetry.freshness import APPLY_DELAY_BUCKETS, ApplyDelayHistogram
from projectionist.telemetry.metrics import MetricsHooks
from tests.projections import PoisonSensitive, Recorder

INFO = WorkerInfo("orders", 1, 4)
LABELS = {"projection": "orders", "worker": "1", "total_workers": "4"}
APPLIED_AT = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)


def event(delay_seconds: float, position: int = 1) -> RecordedEvent:
    """An event appended ``delay_seconds`` before APPLIED_AT."""
    return RecordedEvent(
        global_position=position,
        transaction_id=position,
        event_id=uuid.uuid4(),
        aggregate_id="a",
        aggregate_version=position,
        event_type="E",
        payload={},
        metadata_json="{}",
        created_at=APPLIED_AT - timedelta(seconds=delay_seconds),
    )


def samples(registry: CollectorRegistry, name: str) -> dict[str, float]:
    """``le`` -> cumulative count of one histogram's buckets, plus ``sum`` and ``count``."""
    out: dict[str, float] = {}
    for family in registry.collect():
        for s in family.samples:
            if s.name == f"{name}_bucket":
                out[s.labels["le"]] = s.value
            elif s.name in (f"{name}_sum", f"{name}_count"):
                out[s.name.rsplit("_", 1)[1]] = s.value
    return out


DELAYS = [0.001, 0.005, 0.2, 4.999, 5.0, 5.001, 12.0, 400.0, -0.5, 0.03]


def test_a_batch_counts_as_one_observation_per_event() -> None:
    """Bucket for bucket, the same numbers as prometheus_client's own histogram fed one by one."""
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    ApplyDelayHistogram("delay_seconds", "d", ["p"], registry=ours).labels("x").observe_batch(
        APPLIED_AT, [event(d, i) for i, d in enumerate(DELAYS)]
    )
    reference = Histogram("delay_seconds", "d", ["p"], buckets=APPLY_DELAY_BUCKETS, registry=theirs)
    for d in DELAYS:
        reference.labels("x").observe(d)
    mine, expected = samples(ours, "delay_seconds"), samples(theirs, "delay_seconds")
    assert mine.keys() == expected.keys()
    for key, value in expected.items():
        assert mine[key] == pytest.approx(value, abs=1e-6), key
    # A delay of exactly the objective's threshold meets it.
    assert mine["5.0"] == 7 and mine["+Inf"] == mine["count"] == len(DELAYS)


def test_batches_add_up_and_the_exemplar_marks_the_longest_delay() -> None:
    registry = CollectorRegistry()
    child = ApplyDelayHistogram("delay_seconds", "d", ["p"], registry=registry).labels("x")
    child.observe_batch(APPLIED_AT, [event(0.002), event(0.004)], "a" * 32)
    child.observe_batch(APPLIED_AT, [event(7.0), event(0.1)], "b" * 32)
    child.observe_batch(APPLIED_AT, [], "c" * 32)  # nothing applied: nothing counted
    values = samples(registry, "delay_seconds")
    assert values["count"] == 4 and values["0.005"] == 2 and values["5.0"] == 3
    assert values["sum"] == pytest.approx(7.106)
    text = generate_openmetrics(registry).decode()
    assert f'delay_seconds_bucket{{le="10.0",p="x"}} 4.0 # {{trace_id="{"b" * 32}"}} 7.0' in text
    assert f'delay_seconds_bucket{{le="0.005",p="x"}} 2.0 # {{trace_id="{"a" * 32}"}} 0.004' in text


def test_buckets_must_increase() -> None:
    with pytest.raises(ValueError, match="increasing"):
        ApplyDelayHistogram("d_seconds", "d", [], buckets=(1.0, 0.5))


def test_metrics_hooks_observe_applied_events_and_track_the_poison_position() -> None:
    registry = CollectorRegistry()
    hooks = MetricsHooks(registry, version="0.1.0")
    hooks.register_worker(INFO)
    assert registry.get_sample_value("projectionist_apply_delay_seconds_count", LABELS) == 0
    assert registry.get_sample_value("projectionist_poison_event_position", LABELS) == 0
    applied = [event(0.01, 1), event(6.0, 2)]
    hooks.after_batch(INFO, BatchResult(2, 0.01, Position(2, 2), applied[-1], applied, APPLIED_AT))
    # A batch without the database's clock (a caller of its own) counts no delay.
    hooks.after_batch(INFO, BatchResult(1, 0.01, Position(3, 3), None, [event(1.0, 3)], None))
    assert registry.get_sample_value("projectionist_apply_delay_seconds_count", LABELS) == 2
    bucket = {**LABELS, "le": "5.0"}
    assert registry.get_sample_value("projectionist_apply_delay_seconds_bucket", bucket) == 1

    stuck = event(0.0, 42)
    hooks.on_error(INFO, "projection", ValueError("the whole batch failed"))
    assert registry.get_sample_value("projectionist_poison_event_position", LABELS) == 0
    hooks.on_error(INFO, "poison", PoisonEventError(stuck, ValueError("bad"), applied_before=0))
    assert registry.get_sample_value("projectionist_poison_event_position", LABELS) == 42
    hooks.after_batch(INFO, BatchResult(1, 0.01, Position(42, 42), stuck, [stuck], APPLIED_AT))
    assert registry.get_sample_value("projectionist_poison_event_position", LABELS) == 0


class _Results(WorkerHooks):
    def __init__(self) -> None:
        self.results: list[BatchResult] = []

    def after_batch(self, info: WorkerInfo, result: BatchResult) -> None:
        self.results.append(result)


@pytest.mark.integration
def test_a_batch_reports_the_database_clock_at_its_commit(conn: Connection) -> None:
    append(conn, "a", [NewEvent("E", {}), NewEvent("E", {})])
    appended = [r[0] for r in conn.execute("SELECT created_at FROM events ORDER BY global_position")]
    captured = _Results()
    processor = Processor(Recorder(), Partition(0, 1), hooks=HookChain([captured]))
    processor.start(conn)
    before = conn.execute("SELECT clock_timestamp()").fetchone()
    processor.run_batch(conn)
    after = conn.execute("SELECT clock_timestamp()").fetchone()
    assert before is not None and after is not None
    (result,) = captured.results
    assert [e.created_at for e in result.applied] == appended
    assert result.applied_at is not None and before[0] <= result.applied_at <= after[0]
    assert all(result.applied_at >= created for created in appended)


@pytest.mark.integration
def test_under_stop_the_events_before_a_poison_event_count_and_it_does_not(conn: Connection) -> None:
    append(conn, "a", [NewEvent("E", {}), NewEvent("E", {"poison": True}), NewEvent("E", {})])
    captured = _Results()
    processor = Processor(
        PoisonSensitive(), Partition(0, 1), hooks=HookChain([captured]), policy=PoisonPolicy.STOP
    )
    processor.start(conn)
    with pytest.raises(PoisonEventError) as stopped:
        processor.run_batch(conn, isolate=True)
    (result,) = captured.results
    assert [e.aggregate_version for e in result.applied] == [1]
    assert getattr(stopped.value.event, "aggregate_version", None) == 2
