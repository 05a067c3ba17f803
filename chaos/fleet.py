"""Worker subprocesses for the scenarios, each watched through its own ``/readyz``.

Every worker is the real command, ``python -m projectionist worker``, with a
``--metrics-port`` of its own. A prober thread per worker asks ``/readyz``
every ``probe_interval`` seconds and keeps each *change* it sees (HTTP code
and worker state), so a scenario can ask afterwards what readiness did
during the fault and when it came back.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from projectionist.testing import ChildProcess, child_env, free_port, projectionist_command, stop_all

ROOT = Path(__file__).resolve().parent.parent
RECORDER = "tests.projections:Recorder"
POISON_SENSITIVE = "tests.projections:PoisonSensitive"


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What one worker process is started with (its command-line flags)."""

    worker_id: int
    total_workers: int
    projection: str = RECORDER
    rescale: bool = False
    poison_policy: str = "stop"
    max_retries: int = 5
    batch_size: int = 100
    poll_interval: float = 0.5

    def args(self) -> list[str]:
        args = [
            "worker",
            *("--worker-id", str(self.worker_id), "--total-workers", str(self.total_workers)),
            *("--projection", self.projection, "--batch-size", str(self.batch_size)),
            *("--poll-interval", str(self.poll_interval), "--poison-policy", self.poison_policy),
            *("--max-retries", str(self.max_retries), "--no-migrate"),
        ]
        return [*args, "--rescale"] if self.rescale else args

    @property
    def partition(self) -> str:
        return f"{self.worker_id}/{self.total_workers}"


@dataclass(frozen=True, slots=True)
class Observation:
    """One answer of ``/readyz`` (``code`` None: nothing listens on the port)."""

    at: float
    code: int | None
    state: str
    reason: str

    @property
    def ready(self) -> bool:
        return self.code == 200


class WorkerProcess:
    """One ``projectionist worker`` subprocess and the prober that watches its ``/readyz``."""

    def __init__(
        self,
        spec: WorkerSpec,
        database_url: str,
        *,
        name: str,
        log_path: Path,
        env: dict[str, str],
        probe_interval: float = 0.1,
        port: int | None = None,
    ) -> None:
        self.spec = spec
        self.name = name
        self.port = port or free_port()
        self.log_path = log_path
        self.probe_interval = probe_interval
        self.timeline: list[Observation] = []
        self.started_at = 0.0
        self.killed_at: float | None = None
        self._env = {**env, "DATABASE_URL": database_url}
        self._lock = threading.Lock()
        self._halt = threading.Event()
        self._child: ChildProcess | None = None
        self._prober = threading.Thread(target=self._probe_loop, name=f"probe-{name}", daemon=True)

    # -- the process -----------------------------------------------------------

    def start(self) -> None:
        args = [*self.spec.args(), "--metrics-port", str(self.port), "--log-level", "INFO"]
        self.started_at = time.monotonic()
        self._child = ChildProcess(
            self.name, projectionist_command(*args), env=self._env, log_path=self.log_path, cwd=ROOT
        )
        self._prober.start()

    @property
    def pid(self) -> int:
        assert self._child is not None
        return self._child.pid

    @property
    def returncode(self) -> int | None:
        return None if self._child is None else self._child.returncode

    def alive(self) -> bool:
        return self._child is not None and self._child.alive()

    def kill9(self) -> float:
        """SIGKILL, then reap. Returns the monotonic time of the kill."""
        assert self._child is not None
        self.killed_at = self._child.kill9()
        return self.killed_at

    def terminate(self) -> None:
        """SIGTERM: the worker finishes its batch and exits 0."""
        if self._child is not None:
            self._child.terminate()

    @property
    def child(self) -> ChildProcess:
        assert self._child is not None, f"{self.name} was never started"
        return self._child

    def close(self) -> None:
        self._halt.set()
        if self._child is not None:
            self._child.close()
        if self._prober.is_alive():
            self._prober.join(timeout=10)

    def log_tail(self, limit: int = 3000) -> str:
        return self._child.output(limit) if self._child is not None else ""

    # -- what it says over HTTP ------------------------------------------------

    def readyz(self, timeout: float = 5.0) -> Observation:
        url = f"http://127.0.0.1:{self.port}/readyz"
        # A process killed mid-response leaves a short read (IncompleteRead,
        # an HTTPException rather than an OSError): that too is nothing answering.
        try:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    code, body = int(response.status), response.read()
            except urllib.error.HTTPError as e:
                code, body = int(e.code), e.read()
        except (OSError, http.client.HTTPException):
            return Observation(time.monotonic(), None, "", "nothing answers")
        try:
            data = json.loads(body)
            workers = data.get("workers") or [{}]
            state = str(workers[0].get("state", ""))
            reason = str(data.get("reason", ""))
        except (ValueError, AttributeError):
            state, reason = "", body[:200].decode(errors="replace")
        return Observation(time.monotonic(), code, state, reason)

    def metrics(self, timeout: float = 5.0) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        """Every sample of ``/metrics``, keyed by (name, labels)."""
        url = f"http://127.0.0.1:{self.port}/metrics"
        with urllib.request.urlopen(url, timeout=timeout) as response:
            text = response.read().decode()
        return {
            (s.name, frozenset(s.labels.items())): float(s.value)
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def sample(self, name: str, **labels: str) -> float | None:
        """One sample's value: the first whose labels include ``labels``."""
        wanted = set(labels.items())
        for (sample_name, sample_labels), value in self.metrics().items():
            if sample_name == name and wanted <= sample_labels:
                return value
        return None

    # -- the prober ------------------------------------------------------------

    def _probe_loop(self) -> None:
        while not self._halt.is_set():
            observation = self.readyz()
            with self._lock:
                last = self.timeline[-1] if self.timeline else None
                if last is None or (last.code, last.state) != (observation.code, observation.state):
                    self.timeline.append(observation)
            if observation.code is None and not self.alive() and self._child is not None:
                return  # dead and gone: nothing more to see
            self._halt.wait(self.probe_interval)

    @property
    def last(self) -> Observation | None:
        with self._lock:
            return self.timeline[-1] if self.timeline else None

    def ready(self) -> bool:
        last = self.last
        return last is not None and last.ready

    def observations(self, since: float = 0.0, until: float = float("inf")) -> list[Observation]:
        """Changes seen in [since, until], with the state in force at ``since`` first."""
        with self._lock:
            timeline = list(self.timeline)
        before = [o for o in timeline if o.at < since]
        during = [o for o in timeline if since <= o.at <= until]
        return before[-1:] + during

    def saw(
        self, predicate: Callable[[Observation], bool], since: float = 0.0, until: float = float("inf")
    ) -> bool:
        with self._lock:
            return any(predicate(o) for o in self.timeline if since <= o.at <= until)

    def first(self, predicate: Callable[[Observation], bool], since: float = 0.0) -> Observation | None:
        with self._lock:
            return next((o for o in self.timeline if o.at >= since and predicate(o)), None)

    def describe(self, since: float = 0.0, until: float = float("inf")) -> str:
        """The readiness history, e.g. ``200 live -> 503 failing -> 200 live``."""
        parts = []
        for o in self.observations(since, until):
            parts.append("down" if o.code is None else f"{o.code} {o.state}".strip())
        return " -> ".join(parts) or "no answer yet"


class Fleet:
    """The worker processes of one scenario, with logs in ``log_dir``."""

    def __init__(self, database_url: str, log_dir: Path, *, extra_env: dict[str, str] | None = None) -> None:
        self.database_url = database_url
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        # The workers load the test projections from this checkout.
        self._env = child_env(extra_env or {}, drop_tracing=True, pythonpath=[ROOT])
        self.processes: list[WorkerProcess] = []

    def spawn(self, spec: WorkerSpec, role: str = "", *, port: int | None = None) -> WorkerProcess:
        """Start a worker; ``port`` reuses a metrics port (a restarted process, as a supervisor would)."""
        index = len(self.processes)
        name = f"w{spec.worker_id}of{spec.total_workers}{'-' + role if role else ''}-{index}"
        proc = WorkerProcess(
            spec,
            self.database_url,
            name=name,
            log_path=self.log_dir / f"{name}.log",
            env=self._env,
            port=port,
        )
        self.processes.append(proc)
        proc.start()
        return proc

    def running(self) -> list[WorkerProcess]:
        return [p for p in self.processes if p.alive()]

    def stop(self, procs: Iterable[WorkerProcess], timeout: float = 30) -> dict[str, int]:
        """SIGTERM ``procs`` together and wait, killing what is left; returns exit codes by name."""
        return stop_all([p.child for p in procs], timeout)

    def close(self) -> None:
        for p in self.processes:
            p.close()

    def logs(self, limit: int = 1500) -> str:
        return "\n".join(
            f"--- {p.name} (exit {p.returncode}) ---\n{p.log_tail(limit)}" for p in self.processes
        )
