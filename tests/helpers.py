"""Plain helpers the tests share: the checkout's root, the CLI as a real subprocess, a worker
thread run for the length of a block, and hooks that record what a worker reports."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from projectionist.hooks import WorkerHooks, WorkerInfo, WorkerState
from projectionist.worker.worker import Worker

ROOT = Path(__file__).resolve().parent.parent
#: A migrated database that each test's own database is copied from.
TEMPLATE_DB = "projectionist_test_template"


def run_cli(
    *args: str, db_url: str | None = None, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m projectionist ARGS`` as a real subprocess, from the checkout's root."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("WORKER_ID", "TOTAL_WORKERS")}
    if db_url is not None:
        full_env["DATABASE_URL"] = db_url
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "projectionist", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=ROOT,
    )


@contextlib.contextmanager
def running(worker: Worker) -> Iterator[Worker]:
    """Start ``worker``'s thread; stop it and wait for it when the block ends, whatever its error."""
    worker.start()
    try:
        yield worker
    finally:
        worker.stop()
        with contextlib.suppress(BaseException):
            worker.join(timeout=15)


class RecordingHooks(WorkerHooks):
    """Everything a worker reports through its hooks, in the order it came."""

    def __init__(self) -> None:
        self.states: list[WorkerState] = []
        #: The states again, each with the reason the worker gave.
        self.reasons: list[tuple[WorkerState, str]] = []
        #: The error type of each error (``database``, ``projection``, ``fenced``, ...).
        self.errors: list[str] = []
        #: The exception of each error, in the same order.
        self.raised: list[BaseException] = []
        self.wakeups: list[str] = []

    def on_state(self, info: WorkerInfo, state: WorkerState, reason: str) -> None:
        self.states.append(state)
        self.reasons.append((state, reason))

    def on_error(self, info: WorkerInfo, error_type: str, error: BaseException) -> None:
        self.errors.append(error_type)
        self.raised.append(error)

    def on_wakeup(self, info: WorkerInfo, source: str) -> None:
        self.wakeups.append(source)
