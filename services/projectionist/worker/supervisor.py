"""``projectionist pool``: every partition of a projection in one process, one thread each.

A supervisor in the spirit of dramatiq's: if one worker dies of an error a
restart cannot fix, the whole pool stops and the error is raised, rather than
leaving a partition silently unprocessed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from projectionist.consume.projection import Projection
from projectionist.hooks import WorkerHooks
from projectionist.partitioning import Partition
from projectionist.settings import WorkerOptions
from projectionist.store.connection import Connection, connect
from projectionist.worker.worker import Worker

log = logging.getLogger(__name__)


class Supervisor:
    """Every partition of one projection, one :class:`Worker` thread each."""

    def __init__(
        self,
        database_url: str,
        projection_factory: Callable[[], Projection],
        partitions: int,
        options: WorkerOptions | None = None,
        *,
        hooks: WorkerHooks | None = None,
        connect_fn: Callable[..., Connection] = connect,
    ) -> None:
        # Each partition gets its own instance: projections may keep per-worker state.
        self.workers = [
            Worker(
                database_url,
                projection_factory(),
                Partition(k, partitions),
                options,
                hooks=hooks,
                connect_fn=connect_fn,
            )
            for k in range(partitions)
        ]

    def start(self) -> None:
        for worker in self.workers:
            worker.start()

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()

    def run(self) -> None:
        """Start every worker and block until all stop; re-raise the first fatal error."""
        self.start()
        try:
            while any(w.is_alive() for w in self.workers):
                for worker in self.workers:
                    worker.join(timeout=0.2)  # raises if that worker died of an error
            # Workers that all died before the first look above still report why.
            for worker in self.workers:
                worker.join(timeout=0)
        except BaseException as first:
            log.error("a pool worker failed; stopping the pool: %s", first)
            self.stop()
            for worker in self.workers:
                # Only the first failure is re-raised; the others are logged here.
                try:
                    worker.join(timeout=30)
                except BaseException as other:
                    if other is not first:
                        log.error("pool worker %s failed too", worker.partition, exc_info=other)
            raise
