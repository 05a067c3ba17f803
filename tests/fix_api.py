"""Serving the append API for tests: real uvicorn, in a thread or as the ``projectionist api`` process.

:class:`ServedApp` runs uvicorn on 127.0.0.1 with an OS-assigned port inside
the test process, which starts in milliseconds; :func:`start_api_process`
runs the real CLI subcommand, for tests of start-up, migrations and tracing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType

import httpx
import uvicorn
from starlette.applications import Starlette

ROOT = Path(__file__).resolve().parent.parent


class ServedApp:
    """``with ServedApp(app) as served:`` serves ``app`` at ``served.url`` until the block ends."""

    def __init__(self, app: Starlette) -> None:
        self.app = app
        self.url = ""
        self._server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
        )
        self._thread = threading.Thread(target=self._server.run, name="uvicorn", daemon=True)

    def __enter__(self) -> ServedApp:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        port = self._server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._server.should_exit = True
        self._thread.join(30)


def start_api_process(
    db_url: str, port: int, *args: str, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """``python -m projectionist api`` on 127.0.0.1:``port``; stderr is kept for failure messages."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("API_", "OTEL_"))}
    full_env.update({"DATABASE_URL": db_url, **(env or {})})
    return subprocess.Popen(
        [sys.executable, "-m", "projectionist", "api", "--host", "127.0.0.1", "--port", str(port), *args],
        env=full_env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_until_serving(proc: subprocess.Popen[str], url: str, timeout: float = 60) -> None:
    """Until ``url/healthz`` answers; raises with the process's stderr if it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the API exited with {proc.returncode}: {proc.communicate()[1]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the API did not answer at {url} within {timeout}s")


def stop_process(proc: subprocess.Popen[str]) -> str:
    """SIGTERM, wait, and return stderr (killing only if it ignores SIGTERM for 20 s)."""
    if proc.poll() is None:
        proc.terminate()
    try:
        _, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err or ""
