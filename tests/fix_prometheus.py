"""A real Prometheus scraping real worker processes under load, for any test that needs PromQL answers.

The session fixture ``prometheus_stack`` starts, against the session's real
PostgreSQL, in a database of its own:

* ``TOTAL_WORKERS`` (2) ``python -m projectionist worker`` subprocesses, each
  serving ``/metrics`` on its own port and exporting spans to a local OTLP sink;
* a load generator thread appending sample events (inside producer spans, so
  the events carry a ``traceparent`` and batch spans get links and the batch
  histogram gets ``trace_id`` exemplars);
* the community postgres_exporter (Debian's package) watching that server,
  with the shipped custom queries (deploy/postgres-exporter/queries.yaml);
* Debian's ``prometheus`` binary with a 1 s scrape and evaluation interval,
  exemplar storage on, and every shipped rule file loaded.

Tests query it with :meth:`PrometheusStack.query` (instant vector),
:meth:`PrometheusStack.wait_until` (poll until a condition holds) and the raw
:meth:`PrometheusStack.api`. A test that stops a worker or pauses the load
must restore it before returning: the stack is shared by the whole session.
"""

from __future__ import annotations

import random
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.trace import SpanKind

from projectionist.demo.sample_events import append_sample_events
from projectionist.store.connection import connect
from projectionist.testing import (
    ChildProcess,
    PostgresServer,
    child_env,
    free_port,
    poll_until,
    projectionist_command,
)
from projectionist.testing.prometheus import (
    PostgresExporter,
    Prometheus,
    Sample,
    exporter_setup,
    http_get,
)
from tests.fix_otlp import OtlpReceiver
from tests.helpers import ROOT, TEMPLATE_DB

RULES_DIR = ROOT / "deploy" / "prometheus" / "rules"
EXPORTER_QUERIES = ROOT / "deploy" / "postgres-exporter" / "queries.yaml"
# The compose stack's job names; the alert rules do not depend on them.
SCRAPE_JOB = "projectionist-workers"
EXPORTER_JOB = "postgres"
PROJECTION = "scalable_projection"

__all__ = ["PROJECTION", "SCRAPE_JOB", "PrometheusStack", "Sample", "http_get"]


def rule_files() -> list[Path]:
    """Every shipped rule file (not promtool's tests), as compose loads them."""
    from dashboards.rules import rule_files as shipped

    return shipped(RULES_DIR)


class StackWorker:
    """One ``projectionist worker`` subprocess of the stack, with its metrics port (restartable)."""

    def __init__(self, worker_id: int, port: int, log_path: Path) -> None:
        self.worker_id = worker_id
        self.port = port
        self.log_path = log_path
        self.child: ChildProcess | None = None
        self.started = False

    def start(self, db_url: str, total_workers: int, env: dict[str, str]) -> None:
        self.started = True
        self.child = ChildProcess(
            f"worker-{self.worker_id}",
            projectionist_command(
                "worker",
                *("--worker-id", str(self.worker_id), "--total-workers", str(total_workers)),
                *("--metrics-port", str(self.port), "--no-migrate"),
            ),
            env=child_env({**env, "DATABASE_URL": db_url, "PYTHONUNBUFFERED": "1"}),
            log_path=self.log_path,
            cwd=ROOT,
        )

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (graceful), then SIGKILL if it does not exit; returns the exit code."""
        if self.child is None:
            return None
        child, self.child = self.child, None
        return child.stop(timeout)

    @property
    def running(self) -> bool:
        return self.child is not None and self.child.alive()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class _OwnRandomIds(IdGenerator):
    """Span and trace ids from a Random of its own.

    The SDK's default draws from the global ``random``, which this thread
    would then change while other tests run; Hypothesis warns when a test's
    data generation sees the global state move under it.
    """

    def __init__(self) -> None:
        self._rng = random.Random()

    def generate_span_id(self) -> int:
        return self._rng.getrandbits(64) or 1

    def generate_trace_id(self) -> int:
        return self._rng.getrandbits(128) or 1


class LoadGenerator:
    """Appends ``events_per_tick`` sample events every ``interval`` seconds, each in a producer span."""

    def __init__(self, db_url: str, *, events_per_tick: int = 20, interval: float = 0.1) -> None:
        self.db_url = db_url
        self.events_per_tick = events_per_tick
        self.interval = interval
        self.appended = 0
        self._lock = threading.Lock()
        self.error: BaseException | None = None
        self._running = threading.Event()
        self._stop = threading.Event()
        self._idle = threading.Event()
        # No span processor: the spans only need to exist so their context is
        # injected into the events' metadata.
        self._tracer = TracerProvider(id_generator=_OwnRandomIds()).get_tracer("tests.load")
        self._thread = threading.Thread(target=self._run, name="load-generator", daemon=True)

    def start(self) -> None:
        self._running.set()
        self._thread.start()

    def pause(self) -> None:
        """Stop appending; returns once no append is in flight."""
        self._idle.clear()
        self._running.clear()
        self._idle.wait(timeout=30)

    def resume(self) -> None:
        self._running.set()

    def close(self) -> None:
        self._stop.set()
        self._running.set()
        self._thread.join(timeout=30)

    def append(self, count: int) -> None:
        """Append ``count`` events now, from the calling thread."""
        with connect(self.db_url, autocommit=True) as conn:
            self._append(conn, count)

    def _append(self, conn: Any, count: int) -> None:
        with self._tracer.start_as_current_span("append sample events", kind=SpanKind.PRODUCER):
            for _ in append_sample_events(conn, count=count, aggregates=64, batch_size=count):
                pass
        with self._lock:
            self.appended += count

    def _run(self) -> None:
        try:
            with connect(self.db_url, autocommit=True) as conn:
                while not self._stop.is_set():
                    if not self._running.is_set():
                        self._idle.set()
                        self._running.wait()
                        continue
                    self._append(conn, self.events_per_tick)
                    self._stop.wait(self.interval)
        except BaseException as e:  # reported by the stack's checks
            self.error = e
        finally:
            self._idle.set()


class PrometheusStack:
    """Workers + load + postgres_exporter + Prometheus. Build with :meth:`start`; always :meth:`close`."""

    def __init__(self, db_url: str, workdir: Path, *, total_workers: int = 2) -> None:
        self.db_url = db_url
        self.workdir = workdir
        self.total_workers = total_workers
        self.otlp = OtlpReceiver()
        self.workers = {
            k: StackWorker(k, free_port(), workdir / f"worker-{k}.log") for k in range(total_workers)
        }
        self.load = LoadGenerator(db_url)
        # The PostgreSQL row of the dashboards and the database alerts read it.
        queries, flags = exporter_setup(db_url, EXPORTER_QUERIES, workdir)
        self.exporter = PostgresExporter(
            db_url, workdir / "postgres-exporter.log", queries=queries, flags=flags
        )
        targets = [f"127.0.0.1:{w.port}" for w in self.workers.values()]
        self.prometheus = Prometheus(
            workdir,
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
                "rule_files": [str(p) for p in rule_files()],
                "scrape_configs": [
                    {"job_name": SCRAPE_JOB, "static_configs": [{"targets": targets}]},
                    {"job_name": EXPORTER_JOB, "static_configs": [{"targets": [self.exporter.target]}]},
                ],
            },
        )
        self.url = self.prometheus.url
        #: Worker processes started again after a stop: counters restarted at 0.
        self.restarts = 0

    # -- lifecycle ---------------------------------------------------------

    def worker_env(self) -> dict[str, str]:
        return {
            "OTEL_EXPORTER_OTLP_ENDPOINT": self.otlp.endpoint,
            "OTEL_SERVICE_NAME": "projectionist-worker",
            "OTEL_BSP_SCHEDULE_DELAY": "500",
            "POLL_INTERVAL": "1",
        }

    def start_worker(self, worker_id: int) -> None:
        worker = self.workers[worker_id]
        if worker.started:
            self.restarts += 1  # its counters start again from 0
        worker.start(self.db_url, self.total_workers, self.worker_env())

    def reload(self) -> None:
        """Make Prometheus re-read ``workdir/prometheus.yml`` (SIGHUP), e.g. after adding a scrape job."""
        self.prometheus.reload()

    def stop_worker(self, worker_id: int) -> int | None:
        return self.workers[worker_id].stop()

    def start(self) -> None:
        for k in self.workers:
            self.start_worker(k)
        self.exporter.start()
        self.prometheus.start()
        self.load.start()
        self.wait_until(
            f'up{{job="{SCRAPE_JOB}"}} == 1',
            lambda r: len(r) == self.total_workers,
            what="every worker scraped",
            timeout=60,
        )

    def close(self) -> None:
        self.load.close()
        for worker in self.workers.values():
            worker.stop()
        self.prometheus.stop()
        self.exporter.stop()
        self.otlp.close()

    # -- queries -----------------------------------------------------------

    def api(self, path: str, **params: str) -> Any:
        """GET ``/api/v1/<path>`` and return its ``data`` (raises on an API error)."""
        return self.prometheus.api(path, **params)

    def query(self, promql: str) -> list[Sample]:
        """An instant query; a scalar result comes back as one sample without labels."""
        return self.prometheus.query(promql)

    def value(self, promql: str) -> float | None:
        """The single sample's value, or ``None`` for an empty result."""
        return self.prometheus.value(promql)

    def wait_until(
        self,
        promql: str,
        condition: Callable[[list[Sample]], bool],
        *,
        what: str,
        timeout: float = 30.0,
    ) -> list[Sample]:
        """Poll ``promql`` until ``condition(result)`` holds; fail with the last result after ``timeout``."""
        try:
            return self.prometheus.wait_until(
                promql, condition, what=what, timeout=timeout, check=self._check_processes
            )
        except AssertionError as e:
            logs = "\n".join(f"--- worker {k} log:\n{w.log_tail()}" for k, w in self.workers.items())
            raise AssertionError(f"{e}\n{logs}") from None

    def wait_until_exemplars(
        self, promql: str, *, start: float, end: float, timeout: float = 30.0
    ) -> list[dict[str, Any]]:
        """``/api/v1/query_exemplars`` once it returns at least one exemplar."""
        data: list[dict[str, Any]] = []

        def found() -> bool:
            nonlocal data
            data = self.api("query_exemplars", query=promql, start=str(start), end=str(end))
            return any(d.get("exemplars") for d in data)

        if poll_until(found, timeout, interval=0.5) is None:
            raise AssertionError(f"no exemplars for {promql} within {timeout}s: {data}")
        return data

    def _check_processes(self) -> None:
        if self.load.error is not None:
            raise AssertionError(f"the load generator failed: {self.load.error!r}")

    def appended(self) -> int:
        """Events in the store (the ground truth the metrics must match)."""
        with connect(self.db_url, autocommit=True) as conn:
            row = conn.execute("SELECT count(*) FROM events").fetchone()
        return int(row[0]) if row else 0

    def metrics_text(self, worker_id: int, *, openmetrics: bool = True) -> str:
        """The raw ``/metrics`` page of one worker."""
        headers = {"Accept": "application/openmetrics-text; version=1.0.0"} if openmetrics else {}
        status, body = http_get(f"http://127.0.0.1:{self.workers[worker_id].port}/metrics", headers=headers)
        assert status == 200, body
        return body.decode()

    def prometheus_log(self) -> str:
        return self.prometheus.log_tail()


@pytest.fixture(scope="session")
def prometheus_stack(pg_server: PostgresServer) -> Iterator[PrometheusStack]:
    """Real workers + load + a real Prometheus, shared by the session (see the module docstring)."""
    with pg_server.fresh_database(TEMPLATE_DB) as url:
        workdir = Path(tempfile.mkdtemp(prefix="projectionist-prometheus-"))
        stack = PrometheusStack(url, workdir)
        try:
            stack.start()
            yield stack
        finally:
            stack.close()
            shutil.rmtree(workdir, ignore_errors=True)
