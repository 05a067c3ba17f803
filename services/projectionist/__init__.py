"""projectionist: gap-safe, partitioned projection workers on PostgreSQL."""

from __future__ import annotations

from projectionist._version import __version__
from projectionist.consume.projection import BaseProjection, Projection, Tx
from projectionist.errors import (
    ConcurrencyError,
    ConfigError,
    FencedError,
    ProjectionError,
    ProjectionistError,
)
from projectionist.partitioning import Partition, fnv1a_32, partition_of
from projectionist.records import (
    ANY,
    NO_STREAM,
    AppendResult,
    ExpectedVersion,
    NewEvent,
    Position,
    RecordedEvent,
)
from projectionist.settings import PoisonPolicy, WorkerOptions
from projectionist.store.appending import StreamAppend, append, append_many
from projectionist.store.streams import read_stream, stream_version
from projectionist.worker.elastic import ElasticWorker
from projectionist.worker.worker import Worker

__all__ = [
    "ANY",
    "NO_STREAM",
    "AppendResult",
    "BaseProjection",
    "ConcurrencyError",
    "ConfigError",
    "ElasticWorker",
    "ExpectedVersion",
    "FencedError",
    "NewEvent",
    "Partition",
    "PoisonPolicy",
    "Position",
    "Projection",
    "ProjectionError",
    "ProjectionistError",
    "RecordedEvent",
    "StreamAppend",
    "Tx",
    "Worker",
    "WorkerOptions",
    "__version__",
    "append",
    "append_many",
    "fnv1a_32",
    "partition_of",
    "read_stream",
    "stream_version",
]
