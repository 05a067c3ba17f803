"""Records: an event read from a row is exactly the frozen dataclass a projection is given."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime

import pytest

from projectionist.records import RecordedEvent, recorded_event_from_row


def test_record_built_from_a_row_matches_the_dataclass() -> None:
    # recorded_event_from_row fills a layout twin of RecordedEvent by field
    # name and then gives it RecordedEvent's class: a field added to one and
    # not the other must fail here, not shift values silently.
    assert RecordedEvent.__slots__ == tuple(f.name for f in dataclasses.fields(RecordedEvent))
    event_id, created = uuid.uuid4(), datetime.now(UTC)
    row = (7, "9", event_id, "agg", 3, "Type", '{"a": [1, 2.5, "x"]}', '{"m": 2}', created, True)
    fast = recorded_event_from_row(row)
    slow = RecordedEvent(7, 9, event_id, "agg", 3, "Type", {"a": [1, 2.5, "x"]}, '{"m": 2}', created)
    assert type(fast) is RecordedEvent
    assert fast == slow
    assert [getattr(fast, f.name) for f in dataclasses.fields(RecordedEvent)] == [
        getattr(slow, f.name) for f in dataclasses.fields(RecordedEvent)
    ]
    assert fast.metadata == {"m": 2}
    assert hash(fast.event_id) == hash(event_id)
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.payload = {}  # type: ignore[misc]
    # A text event id (as from a connection without psycopg's uuid loader) is parsed.
    assert recorded_event_from_row((7, "9", str(event_id), *row[3:])).event_id == event_id
