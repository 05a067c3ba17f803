"""Serving the append API inside the test process: real uvicorn on 127.0.0.1, in a thread.

It starts in milliseconds; tests of start-up, migrations and tracing run the
real ``projectionist api`` process instead (:func:`projectionist.testing.start_api`).
"""

from __future__ import annotations

import threading
from types import TracebackType

import uvicorn
from starlette.applications import Starlette

from projectionist.testing import poll_until


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
        poll_until(lambda: self._server.started or not self._thread.is_alive(), timeout=30, interval=0.01)
        if not self._server.started:
            raise RuntimeError("uvicorn did not start")
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
