"""The read path and processing: the projection contract, the gap-safe reader, batches and checkpoints."""

from __future__ import annotations

from projectionist.consume.dead_letters import DeadLetter
from projectionist.consume.processor import BatchOutcome, Processor
from projectionist.consume.projection import BaseProjection, Projection, Tx, load_projection
from projectionist.consume.reader import PartitionReader, RetiredGroupMarks
from projectionist.consume.status import StoreStatus, read_status

__all__ = [
    "BaseProjection",
    "BatchOutcome",
    "DeadLetter",
    "PartitionReader",
    "Processor",
    "Projection",
    "RetiredGroupMarks",
    "StoreStatus",
    "Tx",
    "load_projection",
    "read_status",
]
