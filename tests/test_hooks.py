"""The hook seam: a hook that fails is logged, and never stops event processing."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import pytest

from projectionist.hooks import WorkerHooks, WorkerInfo
from projectionist.partitioning import Partition
from projectionist.records import RecordedEvent
from projectionist.settings import WorkerOptions
from projectionist.store.connection import connect
from projectionist.testing import poll_until
from projectionist.worker.worker import Worker
from tests.helpers import running
from tests.projections import Recorder, applied_count, load_sample

pytestmark = pytest.mark.integration


class BrokenExporter(WorkerHooks):
    """A tracing/metrics hook whose scope raises when it closes (say, a failing exporter)."""

    @contextlib.contextmanager
    def batch_scope(self, info: WorkerInfo, events: Sequence[RecordedEvent]) -> Iterator[None]:
        yield
        raise RuntimeError("exporter unavailable")


def test_a_failing_hook_scope_never_stops_event_processing(db_url: str) -> None:
    # A broken exporter must never stop event processing, on leaving a batch's scope
    # as on entering it: neither roll the batch back nor end the worker.
    worker = Worker(
        db_url, Recorder(), Partition(0, 1), WorkerOptions(poll_interval=0.1), hooks=BrokenExporter()
    )
    with connect(db_url, autocommit=True) as conn, running(worker):
        load_sample(conn, 50, 5)
        applied = poll_until(lambda: applied_count(conn) == 50, timeout=5) is not None
        died = not worker.is_alive()
        assert applied and not died, f"applied {applied_count(conn)} of 50; worker died: {worker._error!r}"
