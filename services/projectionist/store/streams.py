"""Reading the store: one stream in version order, events by id, and the head position."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql

from projectionist.records import RecordedEvent, recorded_event_from_row
from projectionist.store import lenient_timestamps
from projectionist.store.connection import AsyncConnection, Connection

_STREAM_VERSION = sql.SQL("SELECT coalesce(max(aggregate_version), 0) FROM events WHERE aggregate_id = %s")


def stream_version(conn: Connection, aggregate_id: str) -> int:
    """The stream's current version; 0 when it has no events."""
    row = conn.execute(_STREAM_VERSION, (aggregate_id,)).fetchone()
    return int(row[0]) if row else 0


async def stream_version_async(conn: AsyncConnection, aggregate_id: str) -> int:
    """:func:`stream_version` on an asyncio connection."""
    cur = await conn.execute(_STREAM_VERSION, (aggregate_id,))
    row = await cur.fetchone()
    return int(row[0]) if row else 0


# payload comes as text and recorded_event_from_row decodes it: psycopg's
# jsonb loader (a Python-level bytes copy, encoding detection, then
# json.loads) took twice as long per row as decoding the str that the C text
# loader returns.
# The server's work is the same either way: text output of jsonb is ::text.
_EVENT_COLUMNS = sql.SQL(
    "e.global_position, e.transaction_id::text AS txid, e.event_id, e.aggregate_id, "
    "e.aggregate_version, e.event_type, e.payload::text, e.metadata::text, e.created_at"
)


_READ_STREAM = sql.SQL(
    "SELECT {cols} FROM events e WHERE e.aggregate_id = %s AND e.aggregate_version >= %s "
    "ORDER BY e.aggregate_version LIMIT %s"
).format(cols=_EVENT_COLUMNS)


def read_stream(
    conn: Connection, aggregate_id: str, *, from_version: int = 1, limit: int = 100
) -> list[RecordedEvent]:
    """Events of one stream in version order, starting at ``from_version``."""
    return _fetch_events(conn, _READ_STREAM, (aggregate_id, from_version, limit))


async def read_stream_async(
    conn: AsyncConnection, aggregate_id: str, *, from_version: int = 1, limit: int = 100
) -> list[RecordedEvent]:
    """:func:`read_stream` on an asyncio connection."""
    params = (aggregate_id, from_version, limit)
    try:
        cur = await conn.execute(_READ_STREAM, params)
        return [recorded_event_from_row(row) for row in await cur.fetchall()]
    except psycopg.DataError as e:
        if not lenient_timestamps.loading_failed(e):
            raise
        async with lenient_timestamps.tolerant(conn.cursor()) as cursor:
            await cursor.execute(_READ_STREAM, params)
            return [lenient_timestamps.event_from_row(row) for row in await cursor.fetchall()]


def read_events(conn: Connection, event_ids: Sequence[str]) -> list[RecordedEvent]:
    """The stored events with these ids, in no particular order."""
    query = sql.SQL("SELECT {cols} FROM events e WHERE e.event_id = ANY(%s::uuid[])").format(
        cols=_EVENT_COLUMNS
    )
    return _fetch_events(conn, query, (list(event_ids),))


def _fetch_events(conn: Connection, query: sql.Composed, params: tuple[Any, ...]) -> list[RecordedEvent]:
    try:
        return [recorded_event_from_row(row) for row in conn.execute(query, params)]
    except psycopg.DataError as e:
        if not lenient_timestamps.loading_failed(e):
            raise
        # A created_at Python cannot hold (lenient_timestamps.py): the event comes back
        # marked, and the processor's poison policy takes it when it is applied.
        with lenient_timestamps.tolerant_cursor(conn) as cursor:
            return [lenient_timestamps.event_from_row(row) for row in cursor.execute(query, params)]


def head_position(conn: Connection) -> int:
    """The highest global position written so far (0 for an empty store).

    Reads the identity sequence rather than ``max(global_position)`` so it is
    O(1); positions taken by rolled-back appends count, which is harmless for
    a "where is the store" gauge.
    """
    row = conn.execute(
        "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM events_global_position_seq"
    ).fetchone()
    return int(row[0]) if row else 0
