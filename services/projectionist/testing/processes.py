"""Child processes for the demo, tests, chaos, benchmarks and experiments.

Each runs in a session of its own, logs to a file, and gets SIGTERM from
Linux if its parent dies, even by SIGKILL: an interrupted run leaves no orphans.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from projectionist.errors import ProjectionistError

# A launcher in front of the real command: it asks Linux to SIGTERM the child
# when its parent dies (PR_SET_PDEATHSIG, which survives exec), gives up if
# the parent is already gone (the race before prctl ran), restores SIGINT
# (a parent started with SIGINT ignored, as `nohup ... &` does, passes that
# on through exec: Locust then ignored its stop signal), then runs the
# command: ``python -m module`` of this interpreter in this very process (one
# interpreter start instead of two), anything else by exec.
# The death signal fires when the *thread* that forked exits, so children
# are started from threads that outlive them: in practice the main thread.
_LAUNCHER = """
import ctypes, os, runpy, signal, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))
except (AttributeError, OSError):
    pass
if os.getppid() != int(sys.argv[1]):
    sys.exit(0)
if sys.argv[2] == sys.executable and sys.argv[3] == "-m":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.argv = sys.argv[4:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
else:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.execvp(sys.argv[2], sys.argv[2:])
"""

#: Settings a user may have exported that would change what a child runs, or
#: make two children fight over one port. Callers set what they mean.
DROPPED_SETTINGS = (
    "DATABASE_URL",
    "WORKER_ID",
    "TOTAL_WORKERS",
    "PARTITIONS",
    "WORKER_MODE",
    "PROJECTION",
    "BATCH_SIZE",
    "POLL_INTERVAL",
    "METRICS_PORT",
    "RESCALE",
    "POISON_POLICY",
    "MAX_RETRIES",
    "API_HOST",
    "API_PORT",
    "API_TOKEN",
)


class HarnessError(ProjectionistError):
    """A child process failed to start or died, or the database could not be prepared."""


def child_env(
    extra: Mapping[str, str] | None = None, *, drop_tracing: bool = False, pythonpath: Sequence[Path] = ()
) -> dict[str, str]:
    """This process's environment without :data:`DROPPED_SETTINGS`, plus ``extra``.

    ``drop_tracing`` also drops the ``OTEL_*`` variables, so a child exports
    no spans whatever the caller's shell has set; ``pythonpath`` is put in
    front of ``PYTHONPATH``.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in DROPPED_SETTINGS and not (drop_tracing and k.startswith("OTEL_"))
    }
    if pythonpath:
        paths = [str(p) for p in pythonpath]
        env["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, [os.environ.get("PYTHONPATH")])])
    env.update(extra or {})
    return env


def python_module(module: str, *args: str) -> list[str]:
    """The command line of ``python -m module args`` in this interpreter."""
    return [sys.executable, "-m", module, *args]


def projectionist_command(*args: str) -> list[str]:
    """The command line of ``projectionist args``, run as ``python -m projectionist``."""
    return python_module("projectionist", *args)


class ChildProcess:
    """One child process, started at once; stdout and stderr go to ``log_path``."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        log_path: Path,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.killed_at: float | None = None
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.started_at = time.monotonic()
        with log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                [sys.executable, "-c", _LAUNCHER, str(os.getpid()), *self.argv],
                env=dict(env),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def send(self, signum: int) -> None:
        if self.alive():
            self.popen.send_signal(signum)

    def terminate(self) -> None:
        """SIGTERM: a worker finishes its batch and exits 0."""
        self.send(signal.SIGTERM)

    def kill9(self) -> float:
        """SIGKILL, then reap; returns the monotonic time of the kill."""
        self.killed_at = time.monotonic()
        self.popen.kill()
        self.popen.wait()
        return self.killed_at

    def wait(self, timeout: float | None) -> int | None:
        """The exit code, or ``None`` if it is still running after ``timeout`` seconds."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 20.0, signum: int = signal.SIGTERM) -> int:
        """Send ``signum``, wait up to ``timeout``, then kill; returns the exit code."""
        self.send(signum)
        return self.reap(timeout)

    def reap(self, timeout: float) -> int:
        """Wait up to ``timeout`` for it to exit, then kill it; returns the exit code.

        Never a second SIGTERM: a worker takes that as "exit now", and one
        that is already shutting down may have its default handler back and die of it.
        """
        code = self.wait(timeout)
        if code is None:
            self.popen.kill()
            code = self.popen.wait()
        return code

    def close(self) -> None:
        """Kill it if it still runs."""
        if self.alive():
            self.popen.kill()
            self.popen.wait()

    def output(self, limit: int = 3000) -> str:
        """The end of its log."""
        try:
            return self.log_path.read_text(errors="replace").strip()[-limit:]
        except OSError:
            return ""

    def last_line(self) -> str:
        """The last line of its log: for a crash, the exception itself."""
        lines = [line for line in self.output(limit=10_000).splitlines() if line.strip()]
        return lines[-1].strip() if lines else "(no output)"

    def __repr__(self) -> str:
        return f"<ChildProcess {self.name} pid={self.pid} returncode={self.returncode}>"


def stop_all(children: Iterable[ChildProcess], timeout: float) -> dict[str, int]:
    """SIGTERM ``children`` together, wait up to ``timeout`` for all, kill the rest; exit codes by name."""
    children = list(children)
    for child in children:
        child.terminate()
    deadline = time.monotonic() + timeout
    return {c.name: c.reap(max(0.0, deadline - time.monotonic())) for c in children}


def start_api(
    database_url: str,
    port: int,
    log_path: Path,
    *args: str,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> ChildProcess:
    """``projectionist api`` on 127.0.0.1:``port``, then ``args``; ``env`` adds to :func:`child_env`.

    It exports no spans unless ``env`` sets the ``OTEL_*`` variables.
    """
    return ChildProcess(
        "api",
        projectionist_command("api", "--host", "127.0.0.1", "--port", str(port), *args),
        env=child_env({"DATABASE_URL": database_url, **(env or {})}, drop_tracing=True),
        log_path=log_path,
        cwd=cwd,
    )


def wait_for_http(url: str, child: ChildProcess, timeout: float = 60.0) -> None:
    """Until ``url`` answers 200; raises with the child's log if it exits or times out first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.alive():
            raise HarnessError(f"{child.name} exited with {child.returncode}:\n{child.output()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise HarnessError(f"{child.name} did not answer at {url} within {timeout:.0f}s:\n{child.output()}")
