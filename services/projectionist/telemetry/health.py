"""A worker process's HTTP port: ``/metrics`` for Prometheus, ``/healthz`` and ``/readyz`` for orchestrators.

``/healthz``: every worker loop ticked within ``max_tick_age``. ``/readyz``:
the database answers and every worker owns its partition; an elastic worker
is ready once it is a member of its group, whatever it owns (members may
outnumber partitions), and while none of the partitions it owns is failing.
``/metrics`` answers in OpenMetrics, which carries exemplars, when asked for it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

from projectionist.errors import one_line
from projectionist.hooks import BatchResult, Membership, WorkerHooks, WorkerInfo, WorkerState

log = logging.getLogger(__name__)

#: Default for HEALTH_MAX_TICK_AGE. Longer than the worst back-off sleep (30 s
#: between retries of a failing projection), during which the loop does not tick.
DEFAULT_MAX_TICK_AGE = 60.0

_READY_STATES = frozenset({WorkerState.CATCHING_UP, WorkerState.LIVE})

StartResponse = Callable[[str, list[tuple[str, str]]], Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


@dataclass(frozen=True, slots=True)
class WorkerHealth:
    projection: str
    worker_id: int
    total_workers: int
    state: WorkerState
    reason: str
    tick_age_seconds: float


@dataclass(frozen=True, slots=True)
class MemberHealth:
    """An elastic worker process: its own state, as a member of its group."""

    projection: str
    name: str
    state: WorkerState
    reason: str
    members: int
    owned: tuple[int, ...]
    tick_age_seconds: float


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    reason: str
    workers: list[WorkerHealth]
    members: list[MemberHealth] | None = None

    def as_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "status": "ok" if self.ok else "fail",
            "reason": self.reason,
            "workers": [
                {
                    "projection": w.projection,
                    "worker": w.worker_id,
                    "total_workers": w.total_workers,
                    "state": w.state.value,
                    "state_reason": w.reason,
                    "tick_age_seconds": round(w.tick_age_seconds, 3),
                }
                for w in self.workers
            ],
        }
        if self.members is not None:
            data["members"] = [
                {
                    "projection": m.projection,
                    "name": m.name,
                    "state": m.state.value,
                    "state_reason": m.reason,
                    "members": m.members,
                    "owned": list(m.owned),
                    "tick_age_seconds": round(m.tick_age_seconds, 3),
                }
                for m in self.members
            ]
        return data


class HealthHooks(WorkerHooks):
    """Tracks each worker's state and last sign of life for the health endpoints.

    Any hook call counts as a tick: they all come from the worker's loop.
    """

    def __init__(
        self, *, max_tick_age: float = DEFAULT_MAX_TICK_AGE, clock: Callable[[], float] = time.monotonic
    ):
        if not max_tick_age > 0:
            raise ValueError("max_tick_age must be greater than 0")
        self.max_tick_age = max_tick_age
        self._clock = clock
        self._lock = threading.Lock()
        self._ticks: dict[WorkerInfo, float] = {}
        self._states: dict[WorkerInfo, tuple[WorkerState, str]] = {}
        #: Elastic members by projection, with the time of their last report.
        self._members: dict[str, tuple[Membership, float]] = {}

    def register_worker(self, info: WorkerInfo) -> None:
        """Known before its first hook call, so a worker that never starts is reported."""
        with self._lock:
            self._ticks.setdefault(info, self._clock())
            self._states.setdefault(info, (WorkerState.STARTING, "not started yet"))

    def _tick(self, info: WorkerInfo) -> None:
        self._ticks[info] = self._clock()

    def on_state(self, info: WorkerInfo, state: WorkerState, reason: str) -> None:
        with self._lock:
            self._states[info] = (state, reason)
            self._tick(info)

    def on_tick(self, info: WorkerInfo) -> None:
        self._tick(info)

    def on_wakeup(self, info: WorkerInfo, source: str) -> None:
        self._tick(info)

    def after_batch(self, info: WorkerInfo, result: BatchResult) -> None:
        self._tick(info)

    def on_error(self, info: WorkerInfo, error_type: str, error: BaseException) -> None:
        self._tick(info)

    def on_membership(self, membership: Membership) -> None:
        with self._lock:
            self._members[membership.projection] = (membership, self._clock())

    def members(self) -> list[MemberHealth]:
        now = self._clock()
        with self._lock:
            return [
                MemberHealth(m.projection, m.name, m.state, m.reason, m.members, m.owned, max(0.0, now - at))
                for m, at in sorted(self._members.values(), key=lambda x: x[0].projection)
            ]

    def _current(self, info: WorkerInfo) -> bool:
        """Whether a worker's entry still counts: an elastic member's only while it owns the partition."""
        member = self._members.get(info.projection)
        if member is None:
            return True
        return info.total_workers == member[0].total_workers and info.worker_id in member[0].owned

    def workers(self) -> list[WorkerHealth]:
        now = self._clock()
        with self._lock:
            infos = sorted(
                (i for i in self._states if self._current(i)), key=lambda i: (i.projection, i.worker_id)
            )
            return [
                WorkerHealth(
                    i.projection,
                    i.worker_id,
                    i.total_workers,
                    self._states[i][0],
                    self._states[i][1],
                    max(0.0, now - self._ticks.get(i, now)),
                )
                for i in infos
            ]

    def liveness(self) -> Verdict:
        workers, members = self.workers(), self.members()
        shown = members or None
        if not workers and not members:
            return Verdict(False, "no worker registered", workers)
        stale = [f"{w.projection} {w.worker_id}/{w.total_workers}" for w in workers if self._stale(w)]
        stale += [f"{m.projection} member {m.name}" for m in members if self._stale(m)]
        if stale:
            return Verdict(
                False,
                f"worker loop has not ticked for more than {self.max_tick_age:g}s: {', '.join(stale)}",
                workers,
                shown,
            )
        return Verdict(True, "worker loop is ticking", workers, shown)

    def _stale(self, w: WorkerHealth | MemberHealth) -> bool:
        return w.tick_age_seconds > self.max_tick_age

    def readiness(self, ping: Callable[[], None] | None = None) -> Verdict:
        workers, members = self.workers(), self.members()
        shown = members or None
        if not workers and not members:
            return Verdict(False, "no worker registered", workers)
        if ping is not None:
            try:
                ping()
            except Exception as e:
                return Verdict(False, f"database unreachable: {one_line(e)}", workers, shown)
        not_ready = [
            f"{m.projection} member {m.name} is {m.state.value} ({m.reason})"
            for m in members
            if m.state not in _READY_STATES
        ]
        not_ready += [
            f"{w.projection} {w.worker_id}/{w.total_workers} is {w.state.value} ({w.reason})"
            for w in workers
            if w.state not in _READY_STATES
        ]
        if not_ready:
            return Verdict(False, "; ".join(not_ready), workers, shown)
        if members:
            owned = sum(len(m.owned) for m in members)
            return Verdict(
                True, f"database reachable, a member of its group, {owned} partition(s) owned", workers, shown
            )
        return Verdict(True, "database reachable and every partition owned", workers)


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    # Fire-and-forget request threads: a slow scrape never blocks shutdown.
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every few seconds would flood the log."""


def make_app(registry: CollectorRegistry, health: HealthHooks, ping: Callable[[], None] | None) -> WSGIApp:
    """The WSGI app behind the port: ``/metrics``, ``/healthz``, ``/readyz``."""
    metrics_app: WSGIApp = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            return metrics_app(environ, start_response)
        if path in ("/healthz", "/livez"):
            verdict = health.liveness()
        elif path == "/readyz":
            verdict = health.readiness(ping)
        else:
            body = json.dumps({"status": "fail", "reason": "not found; try /metrics, /healthz, /readyz"})
            start_response("404 Not Found", [("Content-Type", "application/json")])
            return [body.encode()]
        status = "200 OK" if verdict.ok else "503 Service Unavailable"
        start_response(status, [("Content-Type", "application/json"), ("Cache-Control", "no-store")])
        return [json.dumps(verdict.as_json()).encode()]

    return app


class HealthServer:
    """Serves :func:`make_app` on ``host:port`` from a daemon thread (port 0 picks a free one)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        health: HealthHooks,
        *,
        port: int,
        host: str = "0.0.0.0",
        ping: Callable[[], None] | None = None,
    ) -> None:
        self._server = make_server(
            host,
            port,
            make_app(registry, health, ping),
            server_class=_ThreadingWSGIServer,
            handler_class=_QuietHandler,
        )
        self.host = host
        self.port = int(self._server.server_port)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="projectionist-http", daemon=True
        )

    def start(self) -> None:
        self._thread.start()
        log.info("serving /metrics, /healthz and /readyz on %s:%d", self.host, self.port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
