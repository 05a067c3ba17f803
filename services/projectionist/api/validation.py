"""Request parsing for the append API: bytes in, validated store records out, or an :class:`ApiError`.

Whatever the database or a read model could not hold (NaN, a NUL byte, a lone
surrogate) is refused here, before a connection is taken, so bad input is a
4xx and never a half-done 500.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from dataclasses import dataclass
from typing import Any

from projectionist.api.errors import ApiError, invalid
from projectionist.records import ANY, NO_STREAM, ExpectedVersion, NewEvent
from projectionist.store.appending import validate_aggregate_id

MAX_EVENT_TYPE_LENGTH = 200
#: Deepest nesting of objects and arrays accepted in ``data`` and ``metadata``.
MAX_JSON_DEPTH = 64
_MAX_BIGINT = 2**63 - 1
# The canonical 8-4-4-4-12 form only: uuid.UUID() would also take braces,
# "urn:uuid:" and bare hex, which JSON Schema's "uuid" format does not.
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_BODY_KEYS = frozenset({"events", "expected_version"})
_EVENT_KEYS = frozenset({"type", "data", "metadata", "id"})


@dataclass(frozen=True, slots=True)
class AppendRequest:
    events: tuple[NewEvent, ...]
    expected_version: ExpectedVersion


def check_aggregate_id(aggregate_id: str) -> str:
    try:
        validate_aggregate_id(aggregate_id)
    except ValueError as e:
        raise ApiError(422, "invalid_aggregate_id", str(e)) from None
    return aggregate_id


def check_content_type(content_type: str | None) -> None:
    """Only JSON is accepted: ``application/json``, optionally with a UTF-8 charset."""
    if not content_type:
        raise ApiError(415, "unsupported_media_type", "Content-Type must be application/json")
    media_type, _, params = content_type.partition(";")
    if media_type.strip().lower() != "application/json":
        raise ApiError(
            415, "unsupported_media_type", f"Content-Type must be application/json, got {media_type!r}"
        )
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in ("utf-8", "utf8"):
            raise ApiError(415, "unsupported_media_type", "only the UTF-8 charset is accepted")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def parse_json(raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8")
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except UnicodeDecodeError:
        raise ApiError(400, "malformed_json", "the body is not valid UTF-8") from None
    except RecursionError:
        raise ApiError(400, "malformed_json", "the body is nested too deeply") from None
    except ValueError as e:  # json.JSONDecodeError, and ints too long to convert
        raise ApiError(400, "malformed_json", f"the body is not valid JSON: {e}") from None


def _check_json_value(value: Any, where: str) -> None:
    """Refuse what PostgreSQL's jsonb cannot hold, and absurd nesting."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise invalid(f"{where} is nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(item, str):
            _check_string(item, where)
        elif isinstance(item, dict):
            for key, child in item.items():
                _check_string(key, where)
                stack.append((child, depth + 1))
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)


def _check_string(text: str, where: str) -> None:
    if "\x00" in text:
        raise invalid(
            f"{where} contains a NUL character (\\u0000), which PostgreSQL's jsonb and text cannot hold"
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise invalid(f"{where} contains an unpaired UTF-16 surrogate") from None


def _parse_expected_version(value: Any) -> ExpectedVersion:
    if value == "any":
        return ANY
    if value == "no_stream":
        return NO_STREAM
    # bool is an int in Python; JSON true is not a version.
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_BIGINT:
        return value
    raise invalid(
        'expected_version must be "any", "no_stream" or an integer >= 0',
        field="expected_version",
    )


def _parse_event(index: int, item: Any) -> NewEvent:
    where = f"events[{index}]"
    if not isinstance(item, dict):
        raise invalid(f"{where} must be an object", field=where)
    unknown = sorted(set(item) - _EVENT_KEYS)
    if unknown:
        raise invalid(f"{where} has unknown fields: {', '.join(unknown)}", field=where)
    event_type = item.get("type")
    if not isinstance(event_type, str) or not event_type:
        raise invalid(f"{where}.type must be a non-empty string", field=f"{where}.type")
    if len(event_type) > MAX_EVENT_TYPE_LENGTH or any(ord(ch) < 32 or ord(ch) == 127 for ch in event_type):
        raise invalid(
            f"{where}.type must be at most {MAX_EVENT_TYPE_LENGTH} characters without control characters",
            field=f"{where}.type",
        )
    _check_string(event_type, f"{where}.type")
    if "data" not in item or not isinstance(item["data"], dict):
        raise invalid(f"{where}.data must be an object", field=f"{where}.data")
    data: dict[str, Any] = item["data"]
    _check_json_value(data, f"{where}.data")
    metadata = item.get("metadata", {})
    if not isinstance(metadata, dict):
        raise invalid(f"{where}.metadata must be an object", field=f"{where}.metadata")
    _check_json_value(metadata, f"{where}.metadata")
    if "id" in item:
        raw_id = item["id"]
        if not isinstance(raw_id, str) or not _UUID.fullmatch(raw_id):
            raise invalid(f"{where}.id must be a UUID string", field=f"{where}.id")
        return NewEvent(event_type, data, metadata, uuid.UUID(raw_id))
    return NewEvent(event_type, data, metadata)


def parse_append_request(body: Any, *, max_events: int) -> AppendRequest:
    """Validate a decoded ``POST /streams/{aggregate_id}/events`` body."""
    if not isinstance(body, dict):
        raise invalid("the body must be a JSON object with an events array")
    unknown = sorted(set(body) - _BODY_KEYS)
    if unknown:
        raise invalid(f"unknown fields: {', '.join(unknown)}")
    items = body.get("events")
    if not isinstance(items, list):
        raise invalid("events must be an array of events", field="events")
    if not items:
        raise ApiError(422, "empty_batch", "events must hold at least one event", field="events")
    if len(items) > max_events:
        raise ApiError(422, "batch_too_large", f"at most {max_events} events per request, got {len(items)}")
    expected = _parse_expected_version(body.get("expected_version", "any"))
    events = tuple(_parse_event(i, item) for i, item in enumerate(items))
    ids = [e.event_id for e in events]
    if len(set(ids)) != len(ids):
        raise invalid("two events in the batch have the same id", field="events")
    return AppendRequest(events, expected)


def parse_query_int(raw: str | None, name: str, *, default: int, low: int, high: int) -> int:
    if raw is None:
        return default
    text = raw.strip()
    # int() would also take "1_000", "+5" and non-ASCII digits; only plain decimals are accepted.
    if not text.isascii() or not text.isdigit() or len(text) > 19:
        raise invalid(f"{name} must be an integer between {low} and {high}", field=name)
    value = int(text)
    if not low <= value <= high:
        raise invalid(f"{name} must be an integer between {low} and {high}", field=name)
    return value
