"""The event store: the events table, appends, stream reads, migrations and wake-ups."""

from __future__ import annotations

from projectionist.store.appending import (
    MAX_AGGREGATE_ID_LENGTH,
    StreamAppend,
    append,
    append_async,
    append_many,
    append_many_async,
    validate_aggregate_id,
)
from projectionist.store.connection import (
    NOTIFY_CHANNEL,
    AsyncConnection,
    Connection,
    connect,
    connection_lost,
    database_url,
)
from projectionist.store.notifier import Notifier
from projectionist.store.schema import applied_versions, migrate
from projectionist.store.streams import (
    head_position,
    read_events,
    read_stream,
    read_stream_async,
    stream_version,
    stream_version_async,
)

__all__ = [
    "MAX_AGGREGATE_ID_LENGTH",
    "NOTIFY_CHANNEL",
    "AsyncConnection",
    "Connection",
    "Notifier",
    "StreamAppend",
    "append",
    "append_async",
    "append_many",
    "append_many_async",
    "applied_versions",
    "connect",
    "connection_lost",
    "database_url",
    "head_position",
    "migrate",
    "read_events",
    "read_stream",
    "read_stream_async",
    "stream_version",
    "stream_version_async",
    "validate_aggregate_id",
]
