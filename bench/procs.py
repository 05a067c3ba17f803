"""Worker subprocesses for the benchmarks: the real ``projectionist worker`` CLI, and the start gate."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

import psycopg

from projectionist.testing import ChildProcess, child_env, projectionist_command, stop_all

ROOT = Path(__file__).resolve().parent.parent
#: The advisory lock key of the start gate ("benc"); see bench.projections.
GATE_KEY = 0x62656E63


def bench_env(url: str, **extra: str) -> dict[str, str]:
    """A bare child: no inherited worker settings and no exporters, so every run measures the same
    thing whatever the caller's shell has set; the benchmark's own modules importable."""
    return child_env({"DATABASE_URL": url, **extra}, drop_tracing=True, pythonpath=[ROOT])


class Children:
    """The child processes of one measurement, stopped together on exit."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[ChildProcess] = []

    def spawn(self, argv: list[str], env: dict[str, str], name: str) -> ChildProcess:
        child = ChildProcess(name, argv, env=env, log_path=self.log_dir / f"{name}.log", cwd=ROOT)
        self.procs.append(child)
        return child

    def check_alive(self) -> None:
        for child in self.procs:
            if not child.alive():
                raise RuntimeError(f"{child.name} exited with {child.returncode}: {child.last_line()}")

    def running(self) -> list[ChildProcess]:
        return [child for child in self.procs if child.alive()]

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc: Any) -> None:
        stop_all(self.procs, timeout=15)
        self.procs.clear()


def cpu_seconds(pids: list[int]) -> float | None:
    """CPU time these processes (all their threads) have used so far, or None where /proc cannot tell.

    Read from each thread's ``schedstat`` in nanoseconds where the kernel has
    it: ``/proc/PID/stat`` counts clock ticks (10 ms), which over a one-second
    catch-up of eight processes is several percent of the total. (A thread
    that ends between two readings takes its time with it; the workers'
    threads live as long as the process.)
    """
    total = 0.0
    for pid in pids:
        spent = _schedstat_seconds(pid)
        if spent is None:
            spent = _stat_seconds(pid)
        if spent is None:
            return None
        total += spent
    return total


def _schedstat_seconds(pid: int) -> float | None:
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
        return sum(int((task / "schedstat").read_text().split()[0]) for task in tasks) / 1e9
    except (OSError, IndexError, ValueError):
        return None


def _stat_seconds(pid: int) -> float | None:
    try:
        # The command name (field 2) may hold spaces, so count fields from its closing parenthesis.
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def backend_pids(conn: psycopg.Connection[Any], app_prefix: str) -> list[int]:
    """Server processes of the connections whose application name starts with ``app_prefix``."""
    return [
        int(row[0])
        for row in conn.execute(
            "SELECT pid FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name LIKE %s",
            (app_prefix + "%",),
        )
    ]


def worker_args(worker_id: int, total: int, projection: str, batch_size: int) -> list[str]:
    return projectionist_command(
        "worker",
        *("--worker-id", str(worker_id), "--total-workers", str(total)),
        *("--projection", projection, "--batch-size", str(batch_size)),
        *("--no-migrate", "--log-level", "WARNING"),
    )


class Gate:
    """Holds the start gate closed on its own connection until :meth:`open`."""

    def __init__(self, url: str) -> None:
        self.conn = psycopg.connect(url, autocommit=True)
        self.conn.execute("SELECT pg_advisory_lock(%s)", (GATE_KEY,))
        self.opened_at: float | None = None

    def waiting(self, app_prefix: str) -> int:
        row = self.conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name LIKE %s AND wait_event_type = 'Lock'",
            (app_prefix + "%",),
        ).fetchone()
        return int(row[0]) if row else 0

    def wait_for(self, app_prefix: str, count: int, children: Children, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while self.waiting(app_prefix) < count:
            children.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"only {self.waiting(app_prefix)} of {count} processes reached the start gate"
                )
            time.sleep(0.02)

    def open(self) -> float:
        self.opened_at = time.time()
        self.conn.execute("SELECT pg_advisory_unlock(%s)", (GATE_KEY,))
        return self.opened_at

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.close()
