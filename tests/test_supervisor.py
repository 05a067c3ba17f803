"""The supervisor (`projectionist pool`): when its workers die, it raises the first error and
reports every other."""

from __future__ import annotations

import pytest

from projectionist.settings import WorkerOptions
from projectionist.store.connection import Connection
from projectionist.worker.supervisor import Supervisor
from tests.projections import Recorder

pytestmark = pytest.mark.integration


class BrokenSetup(Recorder):
    name = "broken_setup"

    def setup(self, conn: Connection) -> None:
        raise RuntimeError("the read model cannot be created")


def test_a_pool_whose_workers_died_before_it_looked_raises_their_error(db_url: str) -> None:
    pool = Supervisor(db_url, BrokenSetup, 2, WorkerOptions(poll_interval=0.1))
    started = pool.start

    def start_and_let_them_die() -> None:
        started()
        for worker in pool.workers:
            assert worker._thread is not None
            worker._thread.join(timeout=15)

    pool.start = start_and_let_them_die  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="cannot be created"):
        pool.run()


class _FailsToSetUp(Recorder):
    def setup(self, conn: Connection) -> None:
        raise RuntimeError(f"setup of worker {self.worker_id} failed")


def test_every_pool_workers_failure_is_reported(db_url: str, caplog: pytest.LogCaptureFixture) -> None:
    # Only the first failure is raised; every other one is logged, not dropped.
    made = iter(range(2))

    def factory() -> Recorder:
        projection = _FailsToSetUp()
        projection.worker_id = next(made)  # type: ignore[attr-defined]
        return projection

    pool = Supervisor(db_url, factory, 2, WorkerOptions(poll_interval=0.2))
    with caplog.at_level("ERROR"), pytest.raises(RuntimeError, match="setup of worker"):
        pool.run()
    assert "setup of worker 0 failed" in caplog.text and "setup of worker 1 failed" in caplog.text
