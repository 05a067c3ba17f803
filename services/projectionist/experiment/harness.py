"""Child processes for load runs and experiments: the API, Locust, workers; a database of their own.

Every child is started so that Linux sends it SIGTERM if this process dies,
even by SIGKILL, so an interrupted run leaves no orphans behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from projectionist.errors import ProjectionistError, one_line

# Settings a user may have exported that would change what the children run.
_ENV_DROPPED = ("WORKER_ID", "TOTAL_WORKERS", "PROJECTION", "METRICS_PORT", "API_PORT")
_PR_SET_PDEATHSIG = 1


class HarnessError(ProjectionistError):
    """A child process failed to start or died, or the database could not be prepared."""


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    with contextlib.suppress(AttributeError, OSError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
    # Children are stopped with SIGINT (Locust) and SIGTERM. A harness run as
    # a background job of a non-interactive shell (`nohup ... &`) starts with
    # SIGINT ignored, which exec passes on: Locust then ignored its stop
    # signal until it was killed, and lost its final reports.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


_handed_out: set[int] = set()
_handed_out_lock = threading.Lock()


def free_port() -> int:
    """A port nothing listens on now, and one this process has not handed out before.

    A port is only taken once its user binds it, and the kernel may offer the
    same free port twice in a row: two workers of one chaos run were once
    given the same METRICS_PORT, and the second could not start.
    """
    with _handed_out_lock:
        while True:
            port = _port_the_kernel_offers()
            if port not in _handed_out:
                _handed_out.add(port)
                return port


def _port_the_kernel_offers() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _ENV_DROPPED}
    env.update(extra)
    return env


class Child:
    """One child process whose stdout and stderr go to ``log_path``."""

    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "wb") as log:
            self.popen = subprocess.Popen(
                list(argv),
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
                # Its own session: a Ctrl-C in the terminal reaches only us,
                # and we stop the children in order.
                start_new_session=True,
            )
        self.started_at = time.monotonic()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def send(self, signum: int) -> None:
        if self.alive():
            self.popen.send_signal(signum)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 20.0, signum: int = signal.SIGTERM) -> int:
        """Ask it to stop, wait up to ``timeout``, then kill; returns the exit code."""
        self.send(signum)
        code = self.wait(timeout)
        if code is None:
            self.popen.kill()
            code = self.popen.wait()
        return code

    def tail(self, limit: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace").strip()[-limit:]
        except OSError:
            return ""


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def start_api(database_url: str, port: int, log_path: Path, *, env: Mapping[str, str] | None = None) -> Child:
    argv = python_module("projectionist", "api", "--host", "127.0.0.1", "--port", str(port))
    return Child("api", argv, child_env(DATABASE_URL=database_url, **(env or {})), log_path)


def start_worker(
    database_url: str, worker_id: int, total_workers: int, log_path: Path, *, extra_args: Sequence[str] = ()
) -> Child:
    argv = python_module(
        "projectionist",
        "worker",
        "--worker-id",
        str(worker_id),
        "--total-workers",
        str(total_workers),
        "--no-migrate",
        "--log-level",
        "WARNING",
        *extra_args,
    )
    return Child(f"worker-{worker_id}", argv, child_env(DATABASE_URL=database_url), log_path)


def wait_for_http(url: str, child: Child, timeout: float = 60.0) -> None:
    """Until ``url`` answers 200; raises with the child's log if it exits or times out first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.alive():
            raise HarnessError(f"{child.name} exited with {child.popen.returncode}:\n{child.tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise HarnessError(f"{child.name} did not answer at {url} within {timeout:.0f}s:\n{child.tail()}")


def dedicated_database(server_url: str, name: str) -> str:
    """Drop and re-create database ``name`` on the server of ``server_url``; return its URL."""
    params = conninfo_to_dict(server_url)
    params["dbname"] = "postgres"
    admin_url = make_conninfo(**params)  # type: ignore[arg-type]
    try:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    except psycopg.Error as e:
        raise HarnessError(f"cannot create database {name!r}: {one_line(e)}") from e
    return make_conninfo(server_url, dbname=name)
