"""The demo's moving parts: worker subprocesses, the background appender, rate meters."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from typing import IO

from projectionist.appender import append_sample_events
from projectionist.db import connect

# The ordinary CLI, preceded by asking Linux to SIGTERM the worker when the
# demo process dies: even a SIGKILLed demo leaves no orphan behind. The parent
# check closes the race of the demo dying before prctl() ran.
_WORKER_BOOT = """
import ctypes, os, signal, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
except (AttributeError, OSError):
    pass
if os.getppid() != int(sys.argv[1]):
    sys.exit(0)
from projectionist.cli import main
sys.exit(main(sys.argv[2:]))
"""

# Settings a user may have exported that would make the demo's workers run
# something else, or fight over one metrics port.
_ENV_DROPPED = ("WORKER_ID", "TOTAL_WORKERS", "PROJECTION", "METRICS_PORT")


class Fleet:
    """``projectionist worker`` subprocesses, one per partition, started one at a time."""

    def __init__(self, database_url: str, total_workers: int) -> None:
        self.total_workers = total_workers
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self._logs: dict[int, IO[bytes]] = {}
        self._env = {k: v for k, v in os.environ.items() if k not in _ENV_DROPPED}
        self._env["DATABASE_URL"] = database_url

    def start(self, worker_id: int) -> None:
        # Closed in close(): it outlives this call, as long as the worker runs.
        log = tempfile.TemporaryFile()  # noqa: SIM115
        self._logs[worker_id] = log
        args = ["worker", "--worker-id", str(worker_id), "--total-workers", str(self.total_workers)]
        self.procs[worker_id] = subprocess.Popen(
            [sys.executable, "-c", _WORKER_BOOT, str(os.getpid()), *args, "--log-level", "WARNING"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self._env,
            # Its own session: a Ctrl-C in the terminal reaches only the demo,
            # which then stops the workers itself, in order.
            start_new_session=True,
        )

    def exited(self) -> dict[int, int]:
        """Workers that have already ended, with their exit codes."""
        codes = {k: p.poll() for k, p in self.procs.items()}
        return {k: c for k, c in codes.items() if c is not None}

    def stop(self, timeout: float) -> dict[int, int]:
        """SIGTERM every worker, wait up to ``timeout``, SIGKILL the rest; returns exit codes."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return {k: p.returncode for k, p in self.procs.items()}

    def kill(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def output(self, worker_id: int, limit: int = 2000) -> str:
        log = self._logs.get(worker_id)
        if log is None:
            return ""
        log.seek(0)
        return log.read().decode("utf-8", "replace").strip()[-limit:]

    def close(self) -> None:
        self.kill()
        for log in self._logs.values():
            log.close()


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
