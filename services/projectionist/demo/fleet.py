"""The demo's moving parts: worker subprocesses, the background appender, rate meters."""

from __future__ import annotations

import math
import shutil
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

from projectionist.demo.sample_events import append_sample_events
from projectionist.store.connection import connect
from projectionist.testing import ChildProcess, child_env, projectionist_command, stop_all


class DemoFleet:
    """``projectionist worker`` subprocesses, one per partition, started one at a time.

    Linux stops them if the demo dies, even by SIGKILL; their logs are kept
    in a temporary directory that :meth:`close` removes.
    """

    def __init__(self, database_url: str, total_workers: int) -> None:
        self.total_workers = total_workers
        self.procs: dict[int, ChildProcess] = {}
        self._env = child_env({"DATABASE_URL": database_url})
        self._log_dir = Path(tempfile.mkdtemp(prefix="projectionist-demo-"))

    def start(self, worker_id: int) -> None:
        args = ["worker", "--worker-id", str(worker_id), "--partitions", str(self.total_workers)]
        self.procs[worker_id] = ChildProcess(
            f"worker-{worker_id}",
            projectionist_command(*args, "--log-level", "WARNING"),
            env=self._env,
            log_path=self._log_dir / f"worker-{worker_id}.log",
        )

    def running(self) -> bool:
        return any(p.alive() for p in self.procs.values())

    def exited(self) -> dict[int, int]:
        """Workers that have already ended, with their exit codes."""
        codes = {k: p.returncode for k, p in self.procs.items()}
        return {k: c for k, c in codes.items() if c is not None}

    def stop(self, timeout: float) -> dict[int, int]:
        """SIGTERM every worker, wait up to ``timeout``, SIGKILL the rest; returns exit codes."""
        codes = stop_all(self.procs.values(), timeout)
        return {k: codes[p.name] for k, p in self.procs.items()}

    def output(self, worker_id: int, limit: int = 2000) -> str:
        proc = self.procs.get(worker_id)
        return proc.output(limit) if proc is not None else ""

    def close(self) -> None:
        for proc in self.procs.values():
            proc.close()
        shutil.rmtree(self._log_dir, ignore_errors=True)


class BackgroundAppender:
    """Appends sample events at a steady ``rate`` per second in a thread, until stopped.

    Like eventsourcing's projection runner, an error in the thread is kept and
    re-raised by :meth:`stop`, so a failing appender fails the demo loudly.
    """

    def __init__(self, database_url: str, *, rate: float, aggregates: int) -> None:
        self.database_url = database_url
        self.rate = rate
        self.aggregates = aggregates
        self.appended = 0
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="demo-appender", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _run(self) -> None:
        try:
            self._append()
        except BaseException as e:  # re-raised by stop()
            self._error = e

    def _append(self) -> None:
        # Ten small transactions a second look like steady traffic, not bursts.
        batch = max(1, math.ceil(self.rate / 10))
        interval = batch / self.rate
        with connect(
            self.database_url, application_name="projectionist:demo-appender", autocommit=True
        ) as conn:
            next_at = time.monotonic()
            for done in append_sample_events(
                conn, count=sys.maxsize, aggregates=self.aggregates, batch_size=batch
            ):
                self.appended = done
                now = time.monotonic()
                # Never burst to catch up after a stall: keep the rate, drop the debt.
                next_at = max(next_at + interval, now - interval)
                if self._stop.wait(max(0.0, next_at - now)):
                    return


class RateMeter:
    """Per-second rate of a growing counter over a short sliding window."""

    def __init__(self, window: float = 1.5) -> None:
        self.window = window
        self._samples: deque[tuple[float, int]] = deque()

    def update(self, now: float, value: int) -> float:
        self._samples.append((now, value))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window:
            self._samples.popleft()
        then, before = self._samples[0]
        return (value - before) / (now - then) if now > then else 0.0
