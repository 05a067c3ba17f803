"""The API's OpenAPI 3 document, written by hand and built from the running settings.

Limits such as the largest batch come from :class:`ApiSettings`, so the document
says what this server enforces. The test suite fuzzes the server from this
document (schemathesis) and checks every response against it.
"""

from __future__ import annotations

from typing import Any

from projectionist import __version__
from projectionist.api.validation import MAX_EVENT_TYPE_LENGTH
from projectionist.settings import ApiSettings
from projectionist.store.appending import MAX_AGGREGATE_ID_LENGTH

_MAX_BIGINT = 2**63 - 1
# No C0 control characters and no DEL: the store refuses them in ids and types.
_NO_CONTROL = "^[^\\u0000-\\u001f\\u007f]*$"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(_ref("Error"), description)


_AGGREGATE_ID = {
    "name": "aggregate_id",
    "in": "path",
    "required": True,
    "description": "The stream's aggregate id: 1 to 255 characters, no control characters.",
    "schema": {
        "type": "string",
        "minLength": 1,
        "maxLength": MAX_AGGREGATE_ID_LENGTH,
        "pattern": _NO_CONTROL,
    },
}


def build_openapi(settings: ApiSettings) -> dict[str, Any]:
    """The document served at ``/openapi.json``."""
    guarded: dict[str, Any] = {"security": [{"bearerAuth": []}]} if settings.token else {}
    unauthorized = {"401": _error("API_TOKEN is set and the bearer token is missing or wrong.")}
    unavailable = {"503": _error("The database is unreachable or every pooled connection is busy.")}
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "projectionist append API",
            "version": __version__,
            "description": (
                "Append events to aggregate streams with optimistic concurrency, and read them back. "
                "Every error is JSON with `error` (a stable code) and `message`. "
                "A rejected request writes nothing."
            ),
        },
        "paths": {
            "/streams/{aggregate_id}/events": {
                "post": {
                    "operationId": "appendEvents",
                    "summary": "Append a batch of events to one stream",
                    "description": (
                        "All events are appended in one transaction, or none is. A W3C `traceparent` "
                        "header is continued into each event's metadata."
                    ),
                    **guarded,
                    "parameters": [
                        _AGGREGATE_ID,
                        {
                            "name": "traceparent",
                            "in": "header",
                            "required": False,
                            "description": "W3C trace context of the caller.",
                            "schema": {"type": "string"},
                        },
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref("AppendRequest")}},
                    },
                    "responses": {
                        "201": _json(_ref("AppendResult"), "Appended; the events' global positions."),
                        "400": _error("The body is not valid JSON (or not UTF-8)."),
                        **unauthorized,
                        "404": _error("No such route (for example, an id that is only dots)."),
                        "409": _json(
                            _ref("Conflict"),
                            "The stream is not at expected_version, or an event id is already stored.",
                        ),
                        "413": _error(f"The body is larger than {settings.max_body_bytes} bytes."),
                        "415": _error("Content-Type is not application/json."),
                        "422": _error("Valid JSON, but not a valid request; `field` names the culprit."),
                        **unavailable,
                    },
                }
            },
            "/streams/{aggregate_id}": {
                "get": {
                    "operationId": "readStream",
                    "summary": "Read a stream's events in version order, one page at a time",
                    **guarded,
                    "parameters": [
                        _AGGREGATE_ID,
                        {
                            "name": "from_version",
                            "in": "query",
                            "required": False,
                            "description": "First version to return (default 1).",
                            "schema": {"type": "integer", "minimum": 1, "maximum": _MAX_BIGINT},
                        },
                        {
                            "name": "limit",
                            "in": "query",
                            "required": False,
                            "description": "Most events to return (default 100).",
                            "schema": {"type": "integer", "minimum": 1, "maximum": settings.max_page_size},
                        },
                    ],
                    "responses": {
                        "200": _json(_ref("StreamPage"), "A page of events."),
                        **unauthorized,
                        "404": _error("The stream has no events."),
                        "422": _error("A query parameter is not a valid integer in range."),
                        **unavailable,
                    },
                }
            },
            "/healthz": {
                "get": {
                    "operationId": "health",
                    "summary": "Liveness: the process is serving requests",
                    "security": [],
                    "responses": {"200": _json(_ref("Health"), "Alive.")},
                }
            },
            "/readyz": {
                "get": {
                    "operationId": "ready",
                    "summary": "Readiness: the database is reachable and migrated",
                    "security": [],
                    "responses": {
                        "200": _json(_ref("Health"), "Ready to take appends."),
                        "503": _json(_ref("Health"), "Not ready; `detail` says why."),
                    },
                }
            },
            "/metrics": {
                "get": {
                    "operationId": "metrics",
                    "summary": "Prometheus metrics (text exposition format)",
                    "security": [],
                    "responses": {
                        "200": {
                            "description": "RED metrics per route template, and events appended.",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document",
                    "security": [],
                    "responses": {
                        "200": _json({"type": "object"}, "The OpenAPI document."),
                    },
                }
            },
        },
        "components": {
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "Required only when the server runs with API_TOKEN set.",
                }
            },
            "schemas": {
                "AppendRequest": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["events"],
                    "properties": {
                        "events": {
                            "type": "array",
                            "minItems": 1,
                            "maxItems": settings.max_events,
                            "items": _ref("NewEvent"),
                        },
                        "expected_version": {
                            "description": (
                                '"any" (default), "no_stream", or the exact current version '
                                "(0 also means the stream must not exist)."
                            ),
                            "oneOf": [
                                {"type": "string", "enum": ["any", "no_stream"]},
                                {"type": "integer", "minimum": 0, "maximum": _MAX_BIGINT},
                            ],
                        },
                    },
                },
                "NewEvent": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["type", "data"],
                    "properties": {
                        "type": {
                            "type": "string",
                            "minLength": 1,
                            "maxLength": MAX_EVENT_TYPE_LENGTH,
                            "pattern": _NO_CONTROL,
                        },
                        "data": {
                            "type": "object",
                            "description": "Any JSON object; strings must not contain \\u0000.",
                        },
                        "metadata": {
                            "type": "object",
                            "description": "Merged over the trace context and stored with the event.",
                        },
                        "id": {
                            "type": "string",
                            "format": "uuid",
                            "description": "Event id; a random one when omitted.",
                        },
                    },
                },
                "AppendResult": {
                    "type": "object",
                    "required": ["aggregate_id", "version", "global_positions"],
                    "properties": {
                        "aggregate_id": {"type": "string"},
                        "version": {"type": "integer", "minimum": 1},
                        "global_positions": {"type": "array", "items": {"type": "integer"}, "minItems": 1},
                    },
                },
                "RecordedEvent": {
                    "type": "object",
                    "required": [
                        "id",
                        "type",
                        "version",
                        "global_position",
                        "data",
                        "metadata",
                        "created_at",
                    ],
                    "properties": {
                        "id": {"type": "string", "format": "uuid"},
                        "type": {"type": "string"},
                        "version": {"type": "integer", "minimum": 1},
                        "global_position": {"type": "integer", "minimum": 1},
                        "data": {"type": "object"},
                        "metadata": {"type": "object"},
                        "created_at": {"type": "string", "format": "date-time"},
                    },
                },
                "StreamPage": {
                    "type": "object",
                    "required": ["aggregate_id", "events", "next_from_version", "next"],
                    "properties": {
                        "aggregate_id": {"type": "string"},
                        "events": {"type": "array", "items": _ref("RecordedEvent")},
                        "next_from_version": {
                            "type": "integer",
                            "nullable": True,
                            "description": "from_version of the next page; null on the last page.",
                        },
                        "next": {
                            "type": "string",
                            "nullable": True,
                            "description": "Relative URL of the next page; null on the last page.",
                        },
                    },
                },
                "Error": {
                    "type": "object",
                    "required": ["error", "message"],
                    "properties": {
                        "error": {"type": "string"},
                        "message": {"type": "string"},
                        "field": {"type": "string"},
                    },
                },
                "Conflict": {
                    "type": "object",
                    "required": ["error", "message", "current_version"],
                    "properties": {
                        "error": {"type": "string", "enum": ["wrong_expected_version", "duplicate_event_id"]},
                        "message": {"type": "string"},
                        "current_version": {"type": "integer", "minimum": 0},
                        "expected_version": {
                            "oneOf": [
                                {"type": "string", "enum": ["any", "no_stream"]},
                                {"type": "integer", "minimum": 0},
                            ]
                        },
                    },
                },
                "Health": {
                    "type": "object",
                    "required": ["status"],
                    "properties": {"status": {"type": "string"}, "detail": {"type": "string"}},
                },
            },
        },
    }
