"""OpenTelemetry traces: one CONSUMER span per batch, linked to each event's producer, with SQL child spans.

Links, not a parent: a batch has many producers. Tracing is on when an OTLP
endpoint is configured (:func:`projectionist.settings.tracing_configured`);
the SDK reads the rest of its ``OTEL_*`` variables itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar, Self

import psycopg
from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Link, SpanKind
from psycopg import sql
from psycopg.abc import Params, Query
from psycopg.rows import TupleRow

from projectionist._version import __version__
from projectionist.hooks import WorkerHooks, WorkerInfo
from projectionist.records import RecordedEvent
from projectionist.store.connection import Connection, connect
from projectionist.store.trace_context import extract_span_context

#: ``messaging.system`` of the batch spans.
MESSAGING_SYSTEM = "projectionist"
#: Links per batch span. Events of one append share a producer context, and
#: links are de-duplicated, so the cap only bites on batches gathered from
#: many separate appends; ``projectionist.links.dropped`` counts the rest.
DEFAULT_MAX_LINKS = 32
DEFAULT_SERVICE_NAME = "projectionist-worker"
# Long statements are cut so a span stays small.
_MAX_QUERY_TEXT = 2048


def configure_tracing(*, default_service_name: str = DEFAULT_SERVICE_NAME) -> TracerProvider:
    """A tracer provider exporting OTLP/HTTP, for a process whose settings say tracing is on.

    The SDK reads its own settings from the standard ``OTEL_*`` variables.
    The caller owns the provider: install it with ``trace.set_tracer_provider``
    if projection code should see it, and call ``shutdown()`` on exit so the
    last spans are flushed.
    """
    # Imported here: the exporter pulls in requests and protobuf, which a
    # process without tracing has no reason to load.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    # Resource.create merges OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME
    # (from os.environ, as the SDK always does); TracerProvider reads
    # OTEL_TRACES_SAMPLER(_ARG); the exporter reads the OTEL_EXPORTER_OTLP_*
    # endpoint, headers and timeout; the processor reads OTEL_BSP_*.
    resource = Resource.create({SERVICE_VERSION: __version__})
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        # Neither variable named the service: a better default than "unknown_service:python".
        resource = resource.merge(Resource({SERVICE_NAME: default_service_name}))
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


def batch_links(events: Sequence[RecordedEvent], max_links: int) -> tuple[list[Link], int]:
    """Links to the distinct producer contexts of ``events`` (up to ``max_links``) and the number dropped."""
    links: list[Link] = []
    seen_headers: set[tuple[str, str]] = set()
    seen_contexts: set[tuple[int, int]] = set()
    seen_raw: set[str] = set()
    dropped = 0
    for event in events:
        raw = event.metadata_json
        if isinstance(raw, str):
            # Metadata is decoded lazily; most events of a batch share one
            # append's metadata text, so look at the text before decoding it
            # (decoding every event's metadata cost ~40% more client CPU).
            if "traceparent" not in raw or raw in seen_raw:
                continue
            seen_raw.add(raw)
        traceparent = event.metadata.get("traceparent")
        if not isinstance(traceparent, str):
            continue
        # De-duplicate on the raw header first: parsing costs about 10 us an
        # event, which on a 500-event catch-up batch would rival applying it.
        # Events of one append share the header, so most are skipped here.
        header = (traceparent, str(event.metadata.get("tracestate", "")))
        if header in seen_headers:
            continue
        seen_headers.add(header)
        if len(links) >= max_links:
            dropped += 1
            continue
        context = extract_span_context(event.metadata)
        if context is None or (context.trace_id, context.span_id) in seen_contexts:
            continue
        seen_contexts.add((context.trace_id, context.span_id))
        links.append(Link(context))
    return links, dropped


class TracingHooks(WorkerHooks):
    """Wraps each batch in a CONSUMER span ``process <projection>`` with messaging attributes and links."""

    def __init__(self, tracer: trace.Tracer, *, max_links: int = DEFAULT_MAX_LINKS) -> None:
        if max_links < 0:
            raise ValueError("max_links must not be negative")
        self.tracer = tracer
        self.max_links = max_links
        self._static: dict[WorkerInfo, tuple[str, dict[str, Any]]] = {}

    def _worker_attributes(self, info: WorkerInfo) -> tuple[str, dict[str, Any]]:
        """The span name and the attributes that stay the same for every batch of this worker."""
        found = self._static.get(info)
        if found is None:
            found = self._static[info] = (
                f"process {info.projection}",
                {
                    "messaging.system": MESSAGING_SYSTEM,
                    "messaging.operation.type": "process",
                    "messaging.operation.name": "process",
                    "messaging.destination.name": info.projection,
                    "messaging.consumer.group.name": info.projection,
                    "messaging.destination.partition.id": str(info.worker_id),
                    "projectionist.total_workers": info.total_workers,
                },
            )
        return found

    @contextmanager
    def batch_scope(self, info: WorkerInfo, events: Sequence[RecordedEvent]) -> Iterator[None]:
        links, dropped = batch_links(events, self.max_links)
        name, static = self._worker_attributes(info)
        attributes = {**static, "messaging.batch.message_count": len(events)}
        if events:
            attributes["projectionist.position.first"] = events[0].global_position
            attributes["projectionist.position.last"] = events[-1].global_position
        if dropped:
            attributes["projectionist.links.dropped"] = dropped
        # start_as_current_span records an exception raised by the projection
        # and sets the span's status to ERROR before re-raising it.
        with self.tracer.start_as_current_span(
            name, kind=SpanKind.CONSUMER, links=links, attributes=attributes
        ):
            yield


def _operation(text: str) -> str:
    words = text.lstrip(" \t\r\n(").split(None, 1)
    return words[0].upper() if words else "SQL"


class TracedCursor(psycopg.Cursor[TupleRow]):
    """A cursor that records each statement as a CLIENT span, but only inside a recording span.

    Outside a batch (polling reads, LISTEN, ownership checks) there is no
    current span and no span is created, so an idle worker does not emit a
    stream of single-span root traces.
    """

    tracer: ClassVar[trace.Tracer] = trace.get_tracer(__name__)

    def execute(
        self,
        query: Query,
        params: Params | None = None,
        *,
        prepare: bool | None = None,
        binary: bool | None = None,
    ) -> Self:
        # Through Any: the base method is overloaded for template strings, and
        # this override forwards whatever it was given unchanged.
        run: Any = super().execute
        if not trace.get_current_span().is_recording():
            run(query, params, prepare=prepare, binary=binary)
            return self
        with self._span(query, None):
            run(query, params, prepare=prepare, binary=binary)
        return self

    def executemany(self, query: Query, params_seq: Any, *, returning: bool = False) -> None:
        if not trace.get_current_span().is_recording():
            super().executemany(query, params_seq, returning=returning)
            return
        params_list = list(params_seq)
        with self._span(query, len(params_list)):
            super().executemany(query, params_list, returning=returning)

    @contextmanager
    def _span(self, query: Query, batch_size: int | None) -> Iterator[None]:
        text = _query_text(query, self.connection)
        operation = _operation(text)
        info = self.connection.info
        attributes: dict[str, Any] = {
            "db.system.name": "postgresql",
            "db.namespace": info.dbname,
            "db.operation.name": operation,
            "db.query.text": text[:_MAX_QUERY_TEXT],
            "server.address": info.host,
            "server.port": info.port,
        }
        if batch_size is not None:
            attributes["db.operation.batch.size"] = batch_size
        with self.tracer.start_as_current_span(
            f"{operation} {info.dbname}", kind=SpanKind.CLIENT, attributes=attributes
        ):
            yield


def _query_text(query: Any, conn: Connection) -> str:
    if isinstance(query, sql.Composable):
        return query.as_string(conn)
    if isinstance(query, bytes | bytearray | memoryview):
        return bytes(query).decode("utf-8", "replace")
    return str(query)


def traced_connect(tracer: trace.Tracer) -> Callable[..., Connection]:
    """A drop-in for :func:`projectionist.store.connect` whose connections trace their statements."""
    cursor_class = type("TracedCursor", (TracedCursor,), {"tracer": tracer})

    def connect_traced(url: str, **kwargs: Any) -> Connection:
        conn = connect(url, **kwargs)
        conn.cursor_factory = cursor_class
        return conn

    return connect_traced
