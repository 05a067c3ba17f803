"""Request handlers of the append API. Each either returns a response or raises :class:`ApiError`."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any
from urllib.parse import quote

from opentelemetry import propagate, trace
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from projectionist import records
from projectionist.api.errors import ApiError
from projectionist.api.openapi import build_openapi
from projectionist.api.state import ApiState
from projectionist.api.validation import (
    check_aggregate_id,
    check_content_type,
    parse_append_request,
    parse_json,
    parse_query_int,
)
from projectionist.errors import ConcurrencyError, one_line
from projectionist.records import RecordedEvent, UndecodablePayload
from projectionist.store.appending import append_async
from projectionist.store.streams import read_stream_async, stream_version_async

tracer = trace.get_tracer("projectionist.api")

_MAX_BIGINT = 2**63 - 1
_READY_TIMEOUT = 2.0


def _state(request: Request) -> ApiState:
    state: ApiState = request.app.state.api
    return state


def _stream_url(aggregate_id: str, from_version: int, limit: int | None = None) -> str:
    url = f"/streams/{quote(aggregate_id, safe='')}?from_version={from_version}"
    return url if limit is None else f"{url}&limit={limit}"


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refusing it with 413 as soon as it is known to exceed ``limit`` bytes.

    A declared Content-Length is checked before reading; a chunked body is
    counted while it streams in, so an oversized one is never held in memory.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise ApiError(413, "body_too_large", f"the body must be at most {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "body_too_large", f"the body must be at most {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def append_events(request: Request) -> Response:
    """``POST /streams/{aggregate_id}/events``: append a batch with optimistic concurrency."""
    state = _state(request)
    aggregate_id = check_aggregate_id(request.path_params["aggregate_id"])
    check_content_type(request.headers.get("content-type"))
    raw = await _read_body(request, state.settings.max_body_bytes)
    body = parse_append_request(parse_json(raw), max_events=state.settings.max_events)

    # Continue the caller's trace: the server span is a child of the incoming
    # traceparent, and the producer span inside it is what the store writes
    # into each event's metadata, so a worker's process span links back here.
    parent = propagate.extract(request.headers)
    with (
        tracer.start_as_current_span(
            "POST /streams/{aggregate_id}/events",
            context=parent,
            kind=trace.SpanKind.SERVER,
            attributes={"http.request.method": "POST", "http.route": "/streams/{aggregate_id}/events"},
        ),
        tracer.start_as_current_span(
            "send events",
            kind=trace.SpanKind.PRODUCER,
            attributes={
                "messaging.system": "projectionist",
                "messaging.operation.type": "send",
                "messaging.destination.name": "events",
                "messaging.batch.message_count": len(body.events),
            },
        ),
    ):
        async with state.connection() as conn:
            try:
                result = await append_async(
                    conn,
                    aggregate_id,
                    body.events,
                    expected_version=body.expected_version,
                )
            except ConcurrencyError as e:
                current = e.actual if e.actual is not None else await stream_version_async(conn, aggregate_id)
                raise ApiError(
                    409,
                    "wrong_expected_version",
                    str(e),
                    current_version=current,
                    expected_version=e.expected if isinstance(e.expected, int) else str(e.expected),
                ) from None
            except ValueError as e:
                # Everything else the store could refuse was validated above;
                # what is left is an event id that is already stored.
                current = await stream_version_async(conn, aggregate_id)
                raise ApiError(409, "duplicate_event_id", str(e), current_version=current) from None

    state.metrics.events_appended.inc(len(result.global_positions))
    return JSONResponse(
        {
            "aggregate_id": result.aggregate_id,
            "version": result.version,
            "global_positions": list(result.global_positions),
        },
        status_code=201,
        headers={"Location": _stream_url(aggregate_id, result.version - len(result.global_positions) + 1)},
    )


def _event_json(event: RecordedEvent) -> dict[str, Any]:
    return {
        "id": str(event.event_id),
        "type": event.event_type,
        "version": event.aggregate_version,
        "global_position": event.global_position,
        "data": event.payload,
        "metadata": event.metadata,
        "created_at": event.created_at.isoformat(),
    }


class _AsciiJSONResponse(JSONResponse):
    """Non-ASCII as \\u escapes: a lone surrogate the store kept stays the escape it was stored as."""

    def render(self, content: Any) -> bytes:
        try:
            text = json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
        except ValueError:
            # A number past double range that a raw-SQL writer stored (the
            # json column takes 1e400; this API refuses it) reads back as inf.
            text = json.dumps(content, ensure_ascii=True, separators=(",", ":"))
            text = _INFINITY_OR_STRING.sub(_as_json_number, text)
        return text.encode("ascii")


# Python writes inf as the bare token Infinity, which is not JSON. Matching
# whole strings too keeps an "Infinity" inside a string as it is. 1e400 reads
# back as infinity in any reader that parses numbers as doubles, Python's too.
_INFINITY_OR_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|(-?)Infinity')


def _as_json_number(match: re.Match[str]) -> str:
    return match.group(0) if match.group(0).startswith('"') else f"{match.group(1)}1e400"


async def read_events(request: Request) -> Response:
    """``GET /streams/{aggregate_id}``: a page of the stream in version order."""
    state = _state(request)
    aggregate_id = check_aggregate_id(request.path_params["aggregate_id"])
    query = request.query_params
    from_version = parse_query_int(
        query.get("from_version"), "from_version", default=1, low=1, high=_MAX_BIGINT
    )
    limit = parse_query_int(
        query.get("limit"), "limit", default=100, low=1, high=state.settings.max_page_size
    )
    async with state.connection() as conn:
        # One extra row tells whether there is a next page without a count.
        events = await read_stream_async(conn, aggregate_id, from_version=from_version, limit=limit + 1)
        if not events and await stream_version_async(conn, aggregate_id) == 0:
            raise ApiError(404, "stream_not_found", f"stream {aggregate_id!r} has no events")
    page = events[:limit]
    if records.undecodable_seen:
        for event in page:
            if isinstance(event.payload, UndecodablePayload):
                # Stored data Python cannot read (raw SQL wrote it), not the
                # client's fault; the version lets it page past the event.
                raise ApiError(
                    500,
                    "unreadable_event",
                    f"version {event.aggregate_version} of this stream cannot be read: {event.payload.error}",
                )
    next_from = page[-1].aggregate_version + 1 if len(events) > limit else None
    return _AsciiJSONResponse(
        {
            "aggregate_id": aggregate_id,
            "events": [_event_json(e) for e in page],
            "next_from_version": next_from,
            "next": _stream_url(aggregate_id, next_from, limit) if next_from is not None else None,
        }
    )


async def health(request: Request) -> Response:
    """``GET /healthz``: the process is up. Never touches the database."""
    return JSONResponse({"status": "ok"})


async def ready(request: Request) -> Response:
    """``GET /readyz``: a pooled connection works and the events table exists."""
    state = _state(request)
    try:
        async with asyncio.timeout(_READY_TIMEOUT):
            if state.pool is None:
                raise RuntimeError("the connection pool is not open")
            async with state.pool.connection(timeout=_READY_TIMEOUT) as conn:
                cur = await conn.execute("SELECT to_regclass('events') IS NOT NULL")
                row = await cur.fetchone()
        if not row or not row[0]:
            return JSONResponse({"status": "not_ready", "detail": "not migrated"}, status_code=503)
    except Exception as e:  # any failure means "not ready"; the probe says why
        detail = one_line(e)
        return JSONResponse({"status": "not_ready", "detail": detail}, status_code=503)
    return JSONResponse({"status": "ready"})


async def metrics(request: Request) -> Response:
    """``GET /metrics``: Prometheus text exposition of the app's registry."""
    registry = _state(request).metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


async def openapi(request: Request) -> Response:
    """``GET /openapi.json``."""
    return JSONResponse(build_openapi(_state(request).settings))
