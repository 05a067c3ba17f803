"""Traces: OTEL_* configuration, the CONSUMER batch span and its links, DB child spans, OTLP on the wire."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import uuid

import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext, SpanKind, TraceFlags

from projectionist.hooks import WorkerState
from projectionist.partitioning import Partition
from projectionist.records import NewEvent, RecordedEvent
from projectionist.settings import TelemetryOptions, WorkerOptions, tracing_configured
from projectionist.store.appending import StreamAppend, append_many
from projectionist.store.connection import Connection
from projectionist.telemetry import Telemetry
from projectionist.telemetry.tracing import batch_links, configure_tracing
from projectionist.testing import wait_for
from projectionist.worker.worker import Worker
from tests.fix_otlp import OtlpReceiver
from tests.fix_prometheus import free_port, http_get
from tests.helpers import ROOT
from tests.projections import Recorder

MESSAGING = {
    "messaging.system": "projectionist",
    "messaging.operation.type": "process",
    "messaging.operation.name": "process",
    "messaging.consumer.group.name": "recorder",
}


def produce(conn: Connection, tracer_provider: TracerProvider, aggregates: list[str]) -> SpanContext:
    """Append one event per aggregate inside a PRODUCER span; returns that span's context."""
    tracer = tracer_provider.get_tracer("tests.producer")
    with tracer.start_as_current_span("append orders", kind=SpanKind.PRODUCER) as span:
        with conn.transaction():
            append_many(conn, [StreamAppend(a, [NewEvent("Placed", {"a": a})]) for a in aggregates])
        return span.get_span_context()


# -- configuration -------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "enabled"),
    [
        ({}, False),
        ({"OTEL_SERVICE_NAME": "x"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"}, False),
    ],
)
def test_tracing_is_on_only_with_an_endpoint(env: dict[str, str], enabled: bool) -> None:
    assert tracing_configured(env) is enabled


def test_no_endpoint_means_no_tracer_and_no_noise(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    telemetry = Telemetry("postgresql://unused", ["x"], TelemetryOptions(tracing=False))
    assert telemetry.tracer_provider is None
    assert caplog.records == []


def test_provider_from_environment_names_the_service(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    provider = configure_tracing()
    try:
        assert provider.resource.attributes["service.name"] == "projectionist-worker"
    finally:
        provider.shutdown()
    monkeypatch.setenv("OTEL_SERVICE_NAME", "billing-projector")
    provider = configure_tracing()
    try:
        assert provider.resource.attributes["service.name"] == "billing-projector"
    finally:
        provider.shutdown()


# -- links ---------------------------------------------------------------------


def recorded(metadata: dict[str, str]) -> RecordedEvent:
    from datetime import UTC, datetime

    return RecordedEvent(1, 1, uuid.uuid4(), "a", 1, "T", {}, metadata, datetime.now(UTC))


def traceparent(trace_id: int, span_id: int) -> dict[str, str]:
    return {"traceparent": f"00-{trace_id:032x}-{span_id:016x}-01"}


def test_links_are_deduplicated_and_capped() -> None:
    events = [
        recorded(traceparent(1, 1)),
        recorded(traceparent(1, 1)),  # same append: one link
        recorded({}),  # appended without a trace: no link
        recorded({"traceparent": "garbage"}),
        recorded(traceparent(2, 5)),
        recorded(traceparent(3, 7)),
    ]
    links, dropped = batch_links(events, max_links=2)
    assert [(link.context.trace_id, link.context.span_id) for link in links] == [(1, 1), (2, 5)]
    assert all(link.context.is_remote and link.context.trace_flags == TraceFlags.SAMPLED for link in links)
    assert dropped == 1


@pytest.mark.parametrize("tracestate", [5, [1], True, None], ids=["int", "list", "bool", "null"])
def test_links_survive_trace_headers_that_are_not_strings(tracestate: object) -> None:
    # Metadata is any JSON object; OpenTelemetry's propagator raises on a
    # non-string header, which must not cost the whole batch its span.
    good = {**traceparent(4, 9), "tracestate": tracestate}
    events = [recorded(good), recorded({"traceparent": 5})]  # type: ignore[dict-item]
    links, dropped = batch_links(events, max_links=8)
    assert [(link.context.trace_id, link.context.span_id) for link in links] == [(4, 9)]
    assert dropped == 0


# -- in process, exported to memory -----------------------------------------------


@pytest.mark.integration
def test_batch_span_is_a_consumer_span_linked_to_the_producers(db_url: str, conn: Connection) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry = Telemetry(db_url, ["recorder"], tracer_provider=provider)
    worker = Worker(
        db_url,
        Recorder(),
        Partition(0, 1),
        WorkerOptions(poll_interval=0.2),
        hooks=telemetry.hook_chain(),
        connect_fn=telemetry.connect_fn,
    )
    producer_a = produce(conn, provider, ["order-1", "order-2"])
    producer_b = produce(conn, provider, ["order-3"])
    with telemetry:
        worker.start()
        try:
            wait_for(lambda: worker.state == WorkerState.LIVE, "the worker to catch up")
        finally:
            worker.stop()
            worker.join(timeout=30)

    spans = exporter.get_finished_spans()
    (batch,) = [s for s in spans if s.kind == SpanKind.CONSUMER]
    assert batch.name == "process recorder"
    assert batch.parent is None  # a batch starts its own trace; producers are links
    assert {k: batch.attributes[k] for k in MESSAGING} == MESSAGING  # type: ignore[index]
    assert batch.attributes["messaging.destination.partition.id"] == "0"  # type: ignore[index]
    assert batch.attributes["messaging.batch.message_count"] == 3  # type: ignore[index]
    linked = {(link.context.trace_id, link.context.span_id) for link in batch.links}
    assert linked == {
        (producer_a.trace_id, producer_a.span_id),
        (producer_b.trace_id, producer_b.span_id),
    }

    db_spans = [s for s in spans if s.kind == SpanKind.CLIENT]
    assert db_spans, "the projection's SQL should appear as child spans"
    for span in db_spans:
        assert span.parent is not None and span.parent.span_id == batch.context.span_id
        assert span.context.trace_id == batch.context.trace_id
        assert span.attributes["db.system.name"] == "postgresql"  # type: ignore[index]
    (insert,) = [s for s in db_spans if s.attributes["db.operation.name"] == "INSERT"]  # type: ignore[index]
    assert "INSERT INTO applied_events" in str(insert.attributes["db.query.text"])  # type: ignore[index]
    assert insert.attributes["db.operation.batch.size"] == 3  # type: ignore[index]
    # Polling, LISTEN and checkpoint reads outside a batch make no spans of their own.
    assert all(s.kind in (SpanKind.CONSUMER, SpanKind.CLIENT, SpanKind.PRODUCER) for s in spans)
    roots: list[ReadableSpan] = [s for s in spans if s.parent is None and s.kind != SpanKind.PRODUCER]
    assert roots == [batch]


# -- on the wire: a worker process exporting OTLP/HTTP protobuf -----------------


@pytest.mark.integration
@pytest.mark.slow
def test_worker_process_exports_otlp_a_receiver_can_decode(
    db_url: str, conn: Connection, otlp_receiver: OtlpReceiver
) -> None:
    producer = produce(conn, TracerProvider(), [f"cart-{i}" for i in range(5)])
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("WORKER_ID", "TOTAL_WORKERS")}
    env.update(
        {
            "DATABASE_URL": db_url,
            "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.endpoint,
            "OTEL_SERVICE_NAME": "wire-test-worker",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "PROJECTION": "tests.projections:Recorder",
        }
    )
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "projectionist", "worker", "--worker-id", "0", "--total-workers", "1"),
            *("--metrics-port", str(port), "--no-migrate"),
        ],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        (batch,) = otlp_receiver.wait_for(lambda s: s.span.kind == ProtoSpan.SPAN_KIND_CONSUMER)
        # The batch's trace id is the exemplar on the batch-duration histogram.
        status, metrics = http_get(
            f"http://127.0.0.1:{port}/metrics",
            headers={"Accept": "application/openmetrics-text; version=1.0.0"},
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=30)[0].decode()
    assert proc.returncode == 0, output

    assert batch.name == "process recorder"
    assert batch.resource["service.name"] == "wire-test-worker"
    assert {k: batch.attributes[k] for k in MESSAGING} == MESSAGING
    assert batch.attributes["messaging.destination.partition.id"] == "0"
    assert batch.attributes["messaging.batch.message_count"] == 5
    assert [(link.trace_id, link.span_id) for link in batch.span.links] == [
        (producer.trace_id.to_bytes(16, "big"), producer.span_id.to_bytes(8, "big"))
    ]
    assert batch.span.parent_span_id == b""

    # The DB child spans made it over the wire too (SIGTERM flushed the rest).
    children = [s for s in otlp_receiver.spans() if s.span.parent_span_id == batch.span.span_id]
    assert children and all(s.span.kind == ProtoSpan.SPAN_KIND_CLIENT for s in children)
    assert {s.span.trace_id for s in children} == {batch.span.trace_id}

    assert status == 200
    trace_id = batch.span.trace_id.hex()
    assert re.search(
        rf'projectionist_batch_duration_seconds_bucket\{{.*\}} 1.0 # {{trace_id="{trace_id}"}}',
        metrics.decode(),
    )
