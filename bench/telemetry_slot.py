"""The telemetry slot: a worker's hooks with metrics, health and tracing all on.

The cost comparison runs the same no-op catch-up through ``Processor`` with
``hooks=WorkerHooks()`` (nothing) and with what a worker process runs when
``METRICS_PORT`` and ``OTEL_EXPORTER_OTLP_ENDPOINT`` are set: the hook chain
from ``projectionist.telemetry.Telemetry`` (logging, tracing, metrics, health)
and its traced connection, which makes every statement a child span. Spans go
through the real OTLP/HTTP exporter to :mod:`bench.otlp_sink`, a separate
process, so serialising and sending them is in the measurement; the metrics
endpoint is up but not scraped during the few seconds of a catch-up.

This module is the one place to adapt if the telemetry API changes.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from projectionist.hooks import WorkerHooks


@dataclass(frozen=True)
class TelemetrySetup:
    hooks: WorkerHooks
    connect_fn: Callable[..., Any]
    description: str


@contextlib.contextmanager
def telemetry(url: str, projection: str) -> Iterator[TelemetrySetup | str]:
    """Yields the setup, or a string saying why it cannot be built."""
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        from projectionist.settings import TelemetryOptions
        from projectionist.telemetry import Telemetry
    except ImportError as e:
        yield f"the telemetry API is not available: {e}"
        return
    sink = subprocess.Popen([sys.executable, "-m", "bench.otlp_sink"], stdout=subprocess.PIPE, text=True)
    try:
        assert sink.stdout is not None
        port = int(sink.stdout.readline())
        provider = TracerProvider()
        provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=f"http://127.0.0.1:{port}/v1/traces"))
        )
        tele = Telemetry(url, [projection], TelemetryOptions(metrics_port=0), tracer_provider=provider)
        with tele:
            hooks = tele.hook_chain()
            kinds = " + ".join(type(h).__name__ for h in hooks.hooks)
            yield TelemetrySetup(hooks, tele.connect_fn, f"{kinds}, traced connection, OTLP/HTTP export")
    finally:
        sink.terminate()
        sink.wait()


@contextlib.contextmanager
def catch_up_kwargs(url: str, projection: str, *, with_telemetry: bool) -> Iterator[dict[str, Any]]:
    """``hooks=`` and ``connect_fn=`` for ``Projectionist.catch_up``: bare, or fully instrumented."""
    if not with_telemetry:
        from projectionist.store.connection import connect

        yield {"hooks": WorkerHooks(), "connect_fn": connect}
        return
    with telemetry(url, projection) as setup:
        if isinstance(setup, str):
            raise RuntimeError(setup)
        yield {"hooks": setup.hooks, "connect_fn": setup.connect_fn}
