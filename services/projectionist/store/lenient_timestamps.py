"""Reading events whose ``created_at`` Python's datetime cannot hold, without killing the reader.

A read that fails on such a row is sent again through a cursor that loads it
as ``None``; the event then fails when applied, and the poison policy takes
it. Off the hot path; why: ``docs/design/json-payloads.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import psycopg
from psycopg import AsyncCursor, Cursor
from psycopg.types.datetime import TimestamptzBinaryLoader, TimestamptzLoader

from projectionist import records
from projectionist.records import RecordedEvent, UndecodablePayload, recorded_event_from_row
from projectionist.store.connection import Connection

#: Stands in for the value that cannot be loaded; the event never reaches a projection.
_PLACEHOLDER = datetime(1, 1, 1, tzinfo=UTC)
_CREATED_AT = 8
_AnyCursor = TypeVar("_AnyCursor", Cursor[Any], AsyncCursor[Any])


class _Tolerant:
    """Put before a timestamptz loader: a value datetime cannot hold loads as ``None``."""

    def load(self, data: Any) -> datetime | None:
        try:
            return super().load(data)  # type: ignore[misc,no-any-return]
        except psycopg.DataError:
            return None


class _TextLoader(_Tolerant, TimestamptzLoader):  # type: ignore[misc]
    pass


class _BinaryLoader(_Tolerant, TimestamptzBinaryLoader):  # type: ignore[misc]
    pass


def loading_failed(error: psycopg.DataError) -> bool:
    """Whether psycopg raised ``error`` loading a value it received, rather than the server raising it."""
    return error.sqlstate is None


def tolerant_cursor(conn: Connection) -> Cursor[Any]:
    """A cursor on ``conn`` that loads an out-of-range timestamptz as ``None``."""
    return tolerant(conn.cursor())


def tolerant(cursor: _AnyCursor) -> _AnyCursor:
    """``cursor``, set to load an out-of-range timestamptz as ``None``."""
    cursor.adapters.register_loader("timestamptz", _TextLoader)
    cursor.adapters.register_loader("timestamptz", _BinaryLoader)
    return cursor


def event_from_row(row: Sequence[Any]) -> RecordedEvent:
    """:func:`~projectionist.records.recorded_event_from_row` for a row a tolerant cursor loaded."""
    if row[_CREATED_AT] is not None:
        return recorded_event_from_row(row)
    event = recorded_event_from_row((*row[:_CREATED_AT], _PLACEHOLDER, *row[_CREATED_AT + 1 :]))
    error = psycopg.DataError(
        f"event at global position {event.global_position} has a created_at outside the years "
        "1-9999 that Python can hold (infinity, or a year past 9999), written by raw SQL"
    )
    # The record is frozen for projections; this is its construction, not a change.
    object.__setattr__(event, "payload", UndecodablePayload(str(row[6]), error))
    records.undecodable_seen = True
    return event
