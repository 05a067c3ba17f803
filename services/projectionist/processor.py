"""One batch: read the partition's next events, apply them, move the checkpoint, commit.

The projection's writes and the checkpoint update share one transaction, so a
crash at any point either keeps both or neither: exactly-once effect for read
models in the same database.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import psycopg

from projectionist.checkpoints import load_checkpoint, save_checkpoint
from projectionist.db import Connection
from projectionist.errors import ProjectionError
from projectionist.hooks import BatchResult, WorkerHooks, WorkerInfo
from projectionist.projection import Projection, Tx
from projectionist.reader import MarkLayer, Partition, PartitionReader
from projectionist.records import Position, RecordedEvent


class BatchOutcome(NamedTuple):
    applied: int
    """Events of this partition applied and committed."""
    more: bool
    """The server had more rows than one window: read again without waiting."""
    visible: bool
    """Any new row at all was visible, ours or another partition's."""


class Processor:
    """Applies one partition of one projection, batch by batch, on a given connection."""

    def __init__(
        self,
        projection: Projection,
        partition: Partition,
        *,
        batch_size: int = 500,
        hooks: WorkerHooks | None = None,
    ) -> None:
        self.projection = projection
        self.partition = partition
        self.reader = PartitionReader(partition, batch_size)
        self.hooks = hooks or WorkerHooks()
        self.info = WorkerInfo(projection.name, partition.worker_id, partition.total_workers)
        self.position: Position | None = None
        batch_handler = getattr(projection, "apply_batch", None)
        self._apply_batch: Callable[[Sequence[RecordedEvent], Tx], None] | None = (
            batch_handler if callable(batch_handler) else None
        )

    def start(self, conn: Connection, layers: tuple[MarkLayer, ...] = ()) -> None:
        """Prepare the projection and load the checkpoint (after every reconnect).

        ``layers`` are the skip marks of retired groups after a rescale.
        """
        with conn.transaction():
            # Workers of one projection start together and would race on
            # CREATE TABLE IF NOT EXISTS (it is not atomic against a concurrent
            # create); a transaction lock per projection makes them take turns.
            conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext('projectionist.setup'), hashtext(%s))",
                (self.projection.name,),
            )
            self.projection.setup(conn)
        self.position = load_checkpoint(conn, self.projection.name, self.partition)
        self.reader = PartitionReader(self.partition, self.reader.batch_size, layers)
        self.reader.forget_passed_marks(self.position)

    def run_batch(self, conn: Connection) -> BatchOutcome:
        """Process one batch and commit it with the checkpoint."""
        assert self.position is not None, "call start() first"
        started = time.perf_counter()
        with conn.transaction():
            batch = self.reader.read(conn, self.position)
            if batch.end is None:
                return BatchOutcome(0, False, False)
            if batch.events:
                tx = Tx(conn, self.projection.name, self.partition.worker_id, self.partition.total_workers)
                with self.hooks.batch_scope(self.info, batch.events):
                    try:
                        if self._apply_batch is not None:
                            self._apply_batch(batch.events, tx)
                        else:
                            for event in batch.events:
                                self.projection.apply(event, tx)
                    except psycopg.OperationalError:
                        raise  # the connection failed, not the projection
                    except Exception as e:
                        raise ProjectionError(
                            f"projection {self.projection.name!r} failed on a batch starting at "
                            f"global position {batch.events[0].global_position}: {e!r}"
                        ) from e
            save_checkpoint(
                conn, self.projection.name, self.partition, self.position, batch.end, len(batch.events)
            )
        self.position = batch.end
        self.reader.forget_passed_marks(batch.end)
        self.hooks.after_batch(
            self.info,
            BatchResult(
                events=len(batch.events),
                duration_seconds=time.perf_counter() - started,
                checkpoint=batch.end,
                last_event=batch.events[-1] if batch.events else None,
            ),
        )
        return BatchOutcome(len(batch.events), batch.window_full, True)
