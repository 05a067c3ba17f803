"""W3C trace context in event metadata: written at append, read back by workers.

Only the OpenTelemetry *API* is used here, which is a no-op until an SDK is
configured, so the store pays nothing when tracing is off.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace


def inject_trace_context() -> dict[str, Any]:
    """``traceparent``/``tracestate`` of the current span, or ``{}`` when there is none."""
    if not trace.get_current_span().get_span_context().is_valid:
        return {}
    carrier: dict[str, Any] = {}
    propagate.inject(carrier)
    return carrier


def extract_span_context(metadata: Mapping[str, Any]) -> trace.SpanContext | None:
    """The producer's span context stored in an event's metadata, if any."""
    if "traceparent" not in metadata:
        return None
    # Metadata is any JSON object: pass the propagator only string headers
    # (a non-string tracestate or baggage makes it raise TypeError).
    carrier = {k: v for k in ("traceparent", "tracestate") if isinstance(v := metadata.get(k), str)}
    ctx = propagate.extract(carrier, context=otel_context.Context())
    span_context = trace.get_current_span(ctx).get_span_context()
    return span_context if span_context.is_valid else None
