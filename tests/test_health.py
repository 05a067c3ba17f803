"""``/healthz``, ``/readyz`` and ``/metrics`` on one port, in-process and from the real CLI."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from prometheus_client import CollectorRegistry

from projectionist.hooks import WorkerInfo, WorkerState
from projectionist.partitioning import Partition
from projectionist.settings import TelemetryOptions, WorkerOptions
from projectionist.store.connection import Connection
from projectionist.telemetry import Telemetry
from projectionist.telemetry.health import HealthHooks
from projectionist.testing import free_port, wait_for
from projectionist.worker.worker import Worker
from tests.fix_prometheus import http_get
from tests.helpers import ROOT, run_cli
from tests.projections import Recorder, applied_count, load_sample

INFO = WorkerInfo("orders", 0, 2)


def get_json(url: str) -> tuple[int, dict[str, object]]:
    status, body = http_get(url)
    return status, json.loads(body)


def clean_env() -> dict[str, str]:
    drop = ("WORKER_ID", "TOTAL_WORKERS", "METRICS_PORT", "HEALTH_MAX_TICK_AGE", "LAG_COUNT_CAP")
    return {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("OTEL_")}


# -- the verdicts, with a controlled clock -----------------------------------


def test_liveness_fails_when_the_loop_stops_ticking() -> None:
    now = [100.0]
    health = HealthHooks(max_tick_age=30, clock=lambda: now[0])
    assert not health.liveness().ok  # nothing registered: nothing is alive
    health.register_worker(INFO)
    assert health.liveness().ok
    now[0] = 129.0
    assert health.liveness().ok
    now[0] = 131.0
    verdict = health.liveness()
    assert not verdict.ok
    assert verdict.reason == "worker loop has not ticked for more than 30s: orders 0/2"
    assert verdict.as_json()["workers"] == [
        {
            "projection": "orders",
            "worker": 0,
            "total_workers": 2,
            "state": "starting",
            "state_reason": "not started yet",
            "tick_age_seconds": 31.0,
        }
    ]
    health.on_tick(INFO)
    assert health.liveness().ok


@pytest.mark.parametrize(
    ("state", "ready"),
    [
        (WorkerState.STARTING, False),
        (WorkerState.STANDBY, False),
        (WorkerState.CATCHING_UP, True),
        (WorkerState.LIVE, True),
        (WorkerState.STOPPING, False),
        (WorkerState.FAILING, False),
    ],
)
def test_readiness_follows_the_worker_state(state: WorkerState, ready: bool) -> None:
    health = HealthHooks()
    health.on_state(INFO, state, "because")
    verdict = health.readiness(ping=lambda: None)
    assert verdict.ok is ready
    if not ready:
        assert verdict.reason == f"orders 0/2 is {state.value} (because)"


def test_readiness_fails_when_the_database_does_not_answer() -> None:
    health = HealthHooks()
    health.on_state(INFO, WorkerState.LIVE, "caught up")

    def ping() -> None:
        raise OSError("connection refused")

    verdict = health.readiness(ping)
    assert not verdict.ok
    assert verdict.reason == "database unreachable: connection refused"


def test_readiness_gives_the_latest_reason_of_a_state() -> None:
    # Failing on the projection, then on the database: /readyz gives the second reason.
    health = HealthHooks()
    worker = Worker("postgresql://unused", Recorder(), Partition(0, 1), hooks=health)
    health.register_worker(worker.info)
    worker._set_state(WorkerState.FAILING, "projection 'recorder' failed on a batch")
    worker._set_state(WorkerState.FAILING, "database unavailable: connection refused")
    assert "database unavailable" in health.readiness().reason


# -- the HTTP port, with real workers -----------------------------------------


@contextmanager
def running_worker(
    db_url: str, partition: Partition, **options: object
) -> Iterator[tuple[Worker, Telemetry]]:
    telemetry = Telemetry(
        db_url,
        ["recorder"],
        TelemetryOptions(metrics_port=0, metrics_host="127.0.0.1", **options),  # type: ignore[arg-type]
        registry=CollectorRegistry(),
    )
    worker = Worker(
        db_url,
        Recorder(),
        partition,
        WorkerOptions(poll_interval=0.2),
        hooks=telemetry.hook_chain(),
    )
    telemetry.register(worker.info)
    with telemetry:
        worker.start()
        try:
            yield worker, telemetry
        finally:
            worker.stop()
            worker.join(timeout=30)


def base_url(telemetry: Telemetry) -> str:
    assert telemetry.server is not None
    return f"http://127.0.0.1:{telemetry.server.port}"


@pytest.mark.integration
def test_one_port_serves_health_readiness_and_metrics(db_url: str) -> None:
    with running_worker(db_url, Partition(0, 1)) as (worker, telemetry):
        url = base_url(telemetry)
        wait_for(lambda: worker.state == WorkerState.LIVE, "the worker to go live")
        status, body = get_json(f"{url}/healthz")
        assert status == 200
        assert body["status"] == "ok"
        assert body["reason"] == "worker loop is ticking"
        status, body = get_json(f"{url}/readyz")
        assert (status, body["reason"]) == (200, "database reachable and every partition owned")

        status, text = http_get(f"{url}/metrics")
        assert status == 200
        assert (
            b'projectionist_partition_owned{projection="recorder",total_workers="1",worker="0"} 1.0' in text
        )
        assert b"# EOF" not in text  # classic text format by default

        request_headers = {"Accept": "application/openmetrics-text; version=1.0.0; charset=utf-8"}
        status, text = http_get(f"{url}/metrics", headers=request_headers)
        assert status == 200
        assert text.rstrip().endswith(b"# EOF")
        assert b"projectionist_events_processed_total" in text

        status, body = get_json(f"{url}/nope")
        assert status == 404

    # Stopped: the port is closed with the telemetry.
    with pytest.raises(OSError):
        http_get(f"{url}/healthz", timeout=2)


@pytest.mark.integration
def test_standby_process_is_alive_but_not_ready(db_url: str) -> None:
    with running_worker(db_url, Partition(0, 1)) as (owner, _):
        wait_for(lambda: owner.state == WorkerState.LIVE, "the owner to go live")
        with running_worker(db_url, Partition(0, 1)) as (standby, telemetry):
            wait_for(lambda: standby.state == WorkerState.STANDBY, "the second process to stand by")
            url = base_url(telemetry)
            assert get_json(f"{url}/healthz")[0] == 200
            status, body = get_json(f"{url}/readyz")
            assert status == 503
            assert body["status"] == "fail"
            assert body["reason"] == "recorder 0/1 is standby (another process owns this partition)"
            registry = telemetry.registry
            assert registry is not None
            labels = {"projection": "recorder", "worker": "0", "total_workers": "1"}
            assert registry.get_sample_value("projectionist_partition_owned", labels) == 0


@pytest.mark.integration
def test_readiness_holds_while_scrapes_take_every_pooled_connection(db_url: str) -> None:
    # Two slow scrapes at once (two Prometheus replicas, a long count) hold
    # the metrics pool's two connections: /readyz must not say the database
    # is unreachable after waiting 2 s for one.
    with running_worker(db_url, Partition(0, 1)) as (worker, telemetry):
        wait_for(lambda: worker.state == WorkerState.LIVE, "the worker to go live")
        pool = telemetry._pool
        assert pool is not None
        with pool.connection(timeout=5), pool.connection(timeout=5):
            status, body = get_json(f"{base_url(telemetry)}/readyz")
        assert (status, body["reason"]) == (200, "database reachable and every partition owned")


def test_readiness_reports_an_unreachable_database() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"postgresql://postgres@127.0.0.1:{port}/nowhere?connect_timeout=1"
    with running_worker(url, Partition(0, 1)) as (worker, telemetry):
        wait_for(lambda: worker.state == WorkerState.FAILING, "the worker to notice")
        status, body = get_json(f"{base_url(telemetry)}/readyz")
        assert status == 503
        assert str(body["reason"]).startswith("database unreachable:")
        assert get_json(f"{base_url(telemetry)}/healthz")[0] == 200


# -- the real command ---------------------------------------------------------


@pytest.mark.integration
def test_worker_command_serves_the_port_and_stops_cleanly(db_url: str) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "projectionist", "worker", "--worker-id", "0", "--total-workers", "1"),
            *("--metrics-port", str(port), "--no-migrate", "--health-max-tick-age", "30"),
        ],
        env={**clean_env(), "DATABASE_URL": db_url},
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:

        def ready() -> bool:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                return http_get(f"http://127.0.0.1:{port}/readyz", timeout=1)[0] == 200
            except OSError:
                return False

        wait_for(ready, "the worker process to be ready", timeout=60)
        status, body = get_json(f"http://127.0.0.1:{port}/healthz")
        assert status == 200 and body["workers"][0]["state"] in ("catching_up", "live")  # type: ignore[index]
        status, text = http_get(f"http://127.0.0.1:{port}/metrics")
        assert b'projectionist_build_info{revision="unknown",version="' in text
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=30)[0].decode()
    assert proc.returncode == 0, output
    assert f"serving /metrics, /healthz and /readyz on 0.0.0.0:{port}" in output
    assert "SIGTERM received: finishing the current batch" in output


# The handler logged from signal context, where a log line that interrupts
# another one on stderr can raise; both messages now come from elsewhere.
@pytest.mark.integration
def test_a_second_sigterm_exits_at_once_and_says_so(db_url: str, conn: Connection) -> None:
    load_sample(conn, 200, 10)
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "projectionist", "worker", "--worker-id", "0", "--total-workers", "1"),
            *("--no-migrate", "--batch-size", "10", "--projection", "tests.projections:Recorder"),
        ],
        env={**clean_env(), "DATABASE_URL": db_url, "RECORDER_SLEEP": "5"},
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: applied_count(conn) > 0 or proc.poll() is not None, "a batch in flight", timeout=60)
        time.sleep(0.5)  # inside the next batch's 5 s sleep
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=10)[0].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, output
    assert "SIGTERM received: finishing the current batch" in output
    assert "projectionist: second SIGTERM: exiting without waiting" in output


def test_busy_metrics_port_exits_2_with_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(
            *("worker", "--worker-id", "0", "--total-workers", "1", "--no-migrate"),
            *("--metrics-port", str(port)),
            db_url="postgresql://unused",
            env={"METRICS_HOST": "127.0.0.1"},
        )
    assert result.returncode == 2, result.stderr
    assert f"METRICS_PORT={port}: cannot listen on 127.0.0.1:{port} (Address already in use)" in result.stderr


@pytest.mark.parametrize(
    ("env", "args", "message"),
    [
        ({"HEALTH_MAX_TICK_AGE": "soon"}, [], "HEALTH_MAX_TICK_AGE='soon' is not a number"),
        (
            {"HEALTH_MAX_TICK_AGE": "inf"},
            [],
            "HEALTH_MAX_TICK_AGE='inf' must be a finite number greater than 0",
        ),
        ({"POLL_INTERVAL": "nan"}, [], "POLL_INTERVAL='nan' must be a finite number greater than 0"),
        ({"LAG_COUNT_CAP": "0"}, [], "LAG_COUNT_CAP='0' must be at least 1"),
        ({}, ["--metrics-port", "70000"], "METRICS_PORT=70000 is not a TCP port"),
    ],
)
def test_invalid_telemetry_settings_exit_2_naming_the_variable(
    env: dict[str, str], args: list[str], message: str
) -> None:
    result = run_cli(
        "worker", "--worker-id", "0", "--total-workers", "1", *args, db_url="postgresql://unused", env=env
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
