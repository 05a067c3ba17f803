"""Worker subprocesses: the real ``python -m projectionist worker`` CLI, and the start gate."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import psycopg

ROOT = Path(__file__).resolve().parent.parent
#: The advisory lock key of the start gate ("benc"); see bench.projections.
GATE_KEY = 0x62656E63


def child_env(url: str, **extra: str) -> dict[str, str]:
    # A bare worker: no inherited worker identity and no exporters, so every
    # run measures the same thing whatever the caller's shell has set.
    drop = ("WORKER_ID", "TOTAL_WORKERS", "METRICS_PORT", "PROJECTION", "BATCH_SIZE", "DATABASE_URL")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("OTEL_")}
    env["DATABASE_URL"] = url
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


class Children:
    """Subprocesses whose output goes to files (a full pipe would stall them), stopped on exit."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[tuple[subprocess.Popen[bytes], Path, IO[bytes]]] = []

    def spawn(self, args: list[str], env: dict[str, str], name: str) -> subprocess.Popen[bytes]:
        path = self.log_dir / f"{name}.log"
        out = path.open("wb")
        proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        self.procs.append((proc, path, out))
        return proc

    def check_alive(self) -> None:
        for proc, path, _ in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{path.stem} exited with {proc.returncode}: {tail(path)}")

    def running(self) -> list[subprocess.Popen[bytes]]:
        return [proc for proc, _, _ in self.procs if proc.poll() is None]

    def output(self, proc: subprocess.Popen[bytes]) -> str:
        for p, path, out in self.procs:
            if p is proc:
                out.flush()
                return path.read_text(errors="replace")
        return ""

    def stop(self, timeout: float = 15) -> None:
        for proc, _, _ in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc, _, out in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            out.close()
        self.procs.clear()

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def tail(path: Path) -> str:
    """The last line of a child's log: for a crash, the exception itself."""
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1].strip() if lines else "(no output)"


def cpu_seconds(pids: list[int]) -> float | None:
    """User plus system CPU these processes have used so far, or None where /proc cannot tell."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            # The command name (field 2) may hold spaces, so count fields from its closing parenthesis.
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


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
    return [
        sys.executable,
        "-m",
        "projectionist",
        "worker",
        "--worker-id",
        str(worker_id),
        "--total-workers",
        str(total),
        "--projection",
        projection,
        "--batch-size",
        str(batch_size),
        "--no-migrate",
        "--log-level",
        "WARNING",
    ]


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
