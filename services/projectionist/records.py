"""The records that cross the store's boundary: new events, recorded events, checkpoints."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any


class StreamState(Enum):
    """Expected-version sentinels for :meth:`EventStore.append`."""

    ANY = "any"
    NO_STREAM = "no_stream"

    def __str__(self) -> str:
        return self.value


ANY = StreamState.ANY
NO_STREAM = StreamState.NO_STREAM

#: ``ANY``, ``NO_STREAM`` or the exact current version (an int >= 0; 0 also means no stream).
ExpectedVersion = StreamState | int


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to append. ``metadata`` may carry correlation/causation ids."""

    type: str
    payload: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)
    event_id: uuid.UUID = field(default_factory=uuid.uuid4)


@dataclass(frozen=True, slots=True)
class RecordedEvent:
    """An event as stored, with its global position and transaction id.

    ``metadata`` is decoded from JSON on first access only: most projections
    never read it, and decoding it for every event cost a third of a
    no-op catch-up's time.
    """

    global_position: int
    transaction_id: int
    event_id: uuid.UUID
    aggregate_id: str
    aggregate_version: int
    event_type: str
    payload: dict[str, Any]
    metadata_json: str | dict[str, Any]
    created_at: datetime
    _metadata: dict[str, Any] | None = field(default=None, compare=False, repr=False)

    @property
    def metadata(self) -> dict[str, Any]:
        if self._metadata is None:
            raw = self.metadata_json
            decoded: dict[str, Any] = raw if isinstance(raw, dict) else json.loads(raw)
            object.__setattr__(self, "_metadata", decoded)  # a cache, not a state change
            return decoded
        return self._metadata


class _UnfrozenRecordedEvent:
    """RecordedEvent's slot layout without its frozen ``__setattr__``.

    The reader builds one RecordedEvent per event read. A frozen dataclass's
    ``__init__`` sets each field through ``object.__setattr__``; here each
    field is a plain slot store, and the finished object is given its real
    class. CPython allows that ``__class__`` assignment only between classes
    of identical layout, which ``__slots__`` copied from RecordedEvent
    guarantees (test_store checks the result against the dataclass).
    It halves the cost of a record next to the payload's decoding.
    """

    __slots__ = RecordedEvent.__slots__


class UndecodablePayload:
    """Stands in for the payload of an event Python cannot read.

    A payload PostgreSQL accepted as JSON but Python's ``json`` cannot decode
    (a number of more than 4300 digits, nesting deeper than the recursion
    limit), or a ``created_at`` outside the years datetime holds (see
    store/lenient_timestamps.py), from a writer other than the store. The processor fails
    the event when it is applied, so the poison policy handles it like any other.
    """

    __slots__ = ("error", "text")

    def __init__(self, text: str, error: Exception) -> None:
        self.text = text
        self.error = error


#: Set once this process has read a payload it could not decode, so that the
#: processor looks for one only from then on, not on every event of every batch.
undecodable_seen = False

_new_object = object.__new__
_decode_json = json.JSONDecoder().raw_decode


def recorded_event_from_row(row: Sequence[Any]) -> RecordedEvent:
    """A RecordedEvent from a row of its nine fields in order, as the store selects them.

    ``transaction_id`` comes as an int (the reader loads binary xid8) or as
    text (xid8 has no int8 cast), ``payload`` as
    JSON text, decoded here with ``raw_decode``: ``json.loads`` wraps it in
    two whitespace regex matches that the store's own ``json.dumps`` output
    never needs, and psycopg's own JSON loader took twice as long per row.
    ``metadata`` stays text until first read. Extra columns after the nine
    are ignored.
    """
    event_id = row[2]
    e: Any = _new_object(_UnfrozenRecordedEvent)
    e.global_position = row[0]
    e.transaction_id = int(row[1])
    e.event_id = event_id if type(event_id) is uuid.UUID else uuid.UUID(str(event_id))
    e.aggregate_id = row[3]
    e.aggregate_version = row[4]
    e.event_type = row[5]
    try:
        e.payload = _decode_json(row[6])[0]
    except (ValueError, RecursionError):
        # Leading whitespace, from a writer other than the store (the column
        # keeps the text as given); the column's type has already checked it is JSON.
        try:
            e.payload = json.loads(row[6])
        except (ValueError, RecursionError) as error:
            global undecodable_seen
            undecodable_seen = True
            e.payload = UndecodablePayload(row[6], error)
    e.metadata_json = row[7]
    e.created_at = row[8]
    e._metadata = None
    e.__class__ = RecordedEvent
    event: RecordedEvent = e
    return event


@dataclass(frozen=True, slots=True, order=True)
class Position:
    """A point in the gap-safe read order: (transaction id, global position)."""

    transaction_id: int = 0
    global_position: int = 0


@dataclass(frozen=True, slots=True)
class AppendResult:
    """What one aggregate's append wrote: its new version and the global positions."""

    aggregate_id: str
    version: int
    global_positions: tuple[int, ...]
