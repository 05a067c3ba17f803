"""One incident's stage: a database, a fleet of workers, the API, load, and a real Prometheus watching them.

:class:`Lab` holds what the whole run shares: the embedded PostgreSQL (the
chaos suite's server, which the lab may stop and start), its
postgres_exporter, and a work directory. :class:`Stage` is one incident's:
a fresh database, four workers of the lab's projection, the append API with
a trickle of appends through it, the chaos suite's load, and a Prometheus of
its own (an empty TSDB, so no incident sees another's alerts) that loads the
shipped rules with their time scaled down (:mod:`incidents.scaling`).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from chaos.checks import Db, Fold
from chaos.fleet import ROOT, Fleet, WorkerProcess, WorkerSpec
from chaos.load import Load
from chaos.server import ChaosServer
from psycopg import sql

from incidents.observe import Observer
from incidents.scaling import write_scaled_rules
from projectionist.consume.partition_indexes import create_indexes
from projectionist.records import NewEvent
from projectionist.store.appending import append
from projectionist.store.connection import connect
from projectionist.testing import (
    TEST_SERVER_SETTINGS,
    ChildProcess,
    free_port,
    poll_until,
    start_api,
    wait_for_http,
)
from projectionist.testing.prometheus import PostgresExporter, Prometheus, Sample, exporter_setup

PROJECTION = "recorder"
PROJECTION_CLASS = "incidents.projection:LabRecorder"
PARTITIONS = 4
#: Shipped time is divided by this: 1 minute of rules is 3 seconds of lab.
FACTOR = 20
#: Scrape and evaluation interval: Prometheus's default minute, divided by FACTOR.
INTERVAL = 60 / FACTOR
#: Every load's aggregates: agg-0 ... agg-39, about ten per partition.
AGGREGATES = 40
#: A role of no privilege that may connect, for the client that hogs connections.
HOG_ROLE = "incident_hog"
EXPORTER_QUERIES = ROOT / "deploy" / "postgres-exporter" / "queries.yaml"
#: Few enough that a client can exhaust them; enough for the fleet, the API and the tools.
MAX_CONNECTIONS = 60


@dataclass(frozen=True, slots=True)
class Profile:
    """How long things take: ``FULL`` for ``make incidents``, ``QUICK`` for CI."""

    name: str
    #: Steady load before the fault, so that rates, baselines and "ok" are established.
    warmup: float
    #: Events per second of the ordinary load.
    rate: float
    #: Longest a fault is held when what it must cause has not all shown yet.
    hold_limit: float
    #: Longest the lab waits, after the fault is removed, for everything to resolve.
    resolve_limit: float
    #: How long PostgreSQL stays down, and how long the steady-load control runs.
    downtime: float
    steady: float


FULL = Profile(
    "full", warmup=40.0, rate=100.0, hold_limit=180.0, resolve_limit=240.0, downtime=30.0, steady=90.0
)
QUICK = Profile(
    "quick", warmup=20.0, rate=100.0, hold_limit=60.0, resolve_limit=120.0, downtime=12.0, steady=20.0
)


class Lab:
    """The run's server, exporter and work directory. Use as a context manager."""

    def __init__(self, *, keep: bool = False) -> None:
        self.keep = keep
        self.workdir = Path(tempfile.mkdtemp(prefix="projectionist-incidents-"))
        settings = {**TEST_SERVER_SETTINGS, "max_connections": str(MAX_CONNECTIONS)}
        self.server = ChaosServer(self.workdir / "server", settings=settings)
        self.exporter: PostgresExporter | None = None
        self.rules_dir = write_scaled_rules(self.workdir / "rules", FACTOR)[0].parent

    def __enter__(self) -> Lab:
        self.server.start()
        with self.server.admin() as admin:
            admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(HOG_ROLE)))
        queries, flags = exporter_setup(self.server.admin_url, EXPORTER_QUERIES, self.workdir / "exporter")
        self.exporter = PostgresExporter(
            self.server.admin_url, self.workdir / "exporter" / "exporter.log", queries=queries, flags=flags
        )
        self.exporter.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.exporter is not None:
            self.exporter.stop()
        self.server.destroy()
        if not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def server_version(self) -> str:
        return self.server.server_version()


class ApiTrickle:
    """A few appends a second through the HTTP API, so that it is scraped with something to show."""

    def __init__(self, base_url: str, *, interval: float = 0.5) -> None:
        self.base_url = base_url
        self.interval = interval
        self.sent = 0
        self.failed = 0
        self.paused = threading.Event()
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, name="api-trickle", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._halt.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        n = 0
        while not self._halt.wait(self.interval):
            if self.paused.is_set():
                continue
            body = json.dumps({"events": [{"type": "ApiEvent", "data": {"n": n}}]}).encode()
            request = urllib.request.Request(
                f"{self.base_url}/streams/api-{n % 8}/events",
                data=body,
                headers={"Content-Type": "application/json"},
                method="POST",
            )
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    response.read()
                self.sent += 1
            except OSError:
                self.failed += 1
            n += 1


class Stage:
    """One incident's database, workers, API, load, Prometheus and observer."""

    def __init__(self, lab: Lab, slug: str, profile: Profile, log_dir: Path) -> None:
        self.lab = lab
        self.slug = slug
        self.profile = profile
        self.log_dir = log_dir
        self.url = lab.server.scenario_database(slug.replace("-", "_"))
        self.db = Db(self.url)
        self.fleet = Fleet(self.url, log_dir, extra_env={"PYTHONUNBUFFERED": "1"})
        self.workers: list[WorkerProcess] = []
        self.load = Load(self.url, rate=profile.rate, aggregates=AGGREGATES, seed=len(slug))
        self.api_port = free_port()
        self.api: ChildProcess | None = None
        self.trickle = ApiTrickle(f"http://127.0.0.1:{self.api_port}")
        self.prometheus: Prometheus | None = None
        self.observer: Observer | None = None
        #: Unix times: the stage ready, the fault injected and removed, everything resolved.
        self.ready_at = 0.0

    # -- set-up ------------------------------------------------------------

    def spec(self, k: int) -> WorkerSpec:
        return WorkerSpec(
            k, PARTITIONS, projection=PROJECTION_CLASS, batch_size=100, poll_interval=0.5, max_retries=2
        )

    def start(self) -> None:
        with connect(self.url, autocommit=True) as conn:
            create_indexes(conn, PARTITIONS)
            # Enough rows for the planner's statistics, so that every worker reads through its
            # partition's index from the start (else ProjectionistPartitionIndexMissing, rightly).
            for i in range(200):
                append(conn, f"agg-{i % AGGREGATES}", [NewEvent("ChaosEvent", {"n": -1 - i})])
            conn.execute("ANALYZE events")
        self.workers = [self.fleet.spawn(self.spec(k)) for k in range(PARTITIONS)]
        if poll_until(lambda: all(w.ready() for w in self.workers), 60) is None:
            raise RuntimeError("the workers did not become ready:\n" + self.fleet.logs())
        self.api = start_api(
            self.url,
            self.api_port,
            self.log_dir / "api.log",
            "--no-migrate",
            env={"PYTHONUNBUFFERED": "1"},
            cwd=ROOT,
        )
        wait_for_http(f"http://127.0.0.1:{self.api_port}/readyz", self.api)
        assert self.lab.exporter is not None
        self.prometheus = Prometheus(self.log_dir / "prometheus", self.prometheus_config())
        self.prometheus.start()
        self.observer = Observer(self.prometheus, PROJECTION)
        self.observer.start()
        self.load.start()
        self.trickle.start()
        targets = 2 + PARTITIONS
        causes = f'projectionist:partition_cause{{projection="{PROJECTION}"}}'

        # Until every target has been scraped, a partition's lag (which every worker reports)
        # can arrive before its owner's series, and the first evaluations say no_owner: the
        # monitoring starting, not a cause of the load's. Ready once Prometheus has seen it all.
        def settled() -> bool:
            shown = self.query_ok(causes)
            return (
                len(self.query_ok("up == 1")) == targets
                and len(shown) == PARTITIONS
                and {s.labels["cause"] for s in shown} == {"ok"}
            )

        if poll_until(settled, 60, 0.5) is None:
            raise RuntimeError(
                f"Prometheus did not see every target, and every partition ok: {self.query_ok(causes)}\n"
                + self.prometheus.log_tail()
            )
        self.ready_at = time.time()

    def prometheus_config(self) -> dict[str, object]:
        assert self.lab.exporter is not None
        interval = f"{INTERVAL:g}s"
        return {
            "global": {
                "scrape_interval": interval,
                "evaluation_interval": interval,
                "scrape_timeout": interval,
            },
            "rule_files": [str(p) for p in sorted(self.lab.rules_dir.glob("*.yml"))],
            "scrape_configs": [
                {
                    "job_name": "projectionist-workers",
                    "static_configs": [{"targets": [f"127.0.0.1:{w.port}" for w in self.workers]}],
                },
                {
                    "job_name": "projectionist-api",
                    "static_configs": [{"targets": [f"127.0.0.1:{self.api_port}"]}],
                },
                {"job_name": "postgres", "static_configs": [{"targets": [self.lab.exporter.target]}]},
            ],
        }

    def query_ok(self, promql: str) -> list[Sample]:
        """An instant query; nothing when Prometheus cannot answer (it may be restarting)."""
        assert self.prometheus is not None
        try:
            return list(self.prometheus.query(promql))
        except Exception:
            return []

    # -- during the incident -------------------------------------------------

    def restart_worker(self, victim: WorkerProcess) -> WorkerProcess:
        """As a supervisor would: the same partition, the same metrics port."""
        replacement = self.fleet.spawn(victim.spec, "restarted", port=victim.port)
        self.workers[self.workers.index(victim)] = replacement
        return replacement

    def wait(self, condition: Callable[[], bool], timeout: float, interval: float = 0.5) -> float | None:
        return poll_until(condition, timeout, interval)

    # -- the end -------------------------------------------------------------

    def finish(self) -> tuple[Fold | None, list[str]]:
        """Stop the load, let the workers catch up, stop everything; the fold and any problems."""
        problems: list[str] = []
        self.trickle.stop()
        try:
            self.load.stop()
        except Exception as e:
            problems.append(f"the load failed: {e!r}")
        if poll_until(lambda: self.db.unapplied(PROJECTION) == 0, 120, 0.5) is None:
            problems.append(f"{self.db.unapplied(PROJECTION)} events still unapplied after the load stopped")
        time.sleep(0.5)  # an event applied twice would land now
        codes = self.fleet.stop(self.fleet.running())
        if any(code != 0 for code in codes.values()):
            problems.append(f"workers did not stop cleanly: {codes}")
        fold = self.db.fold(PROJECTION)
        return fold, problems

    def close(self) -> None:
        self.trickle.stop()
        self.load.stop_quietly()
        if self.observer is not None:
            self.observer.stop()
        if self.prometheus is not None:
            self.prometheus.stop()
        if self.api is not None:
            self.api.stop(timeout=15)
        self.fleet.close()
        self.db.close()
