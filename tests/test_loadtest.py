"""The Locust load tests: key distributions, thresholds, the Prometheus exporter, and real headless runs.

The smoke runs start ``make load``'s runner as a subprocess: a real API
(uvicorn) on real PostgreSQL, loaded by a real headless Locust for a few
seconds. Locust is never imported here: it monkey-patches the process.
"""

from __future__ import annotations

import collections
import csv
import json
import logging
import os
import random
import re
import socket
import subprocess
import sys
import types
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

import loadgen
import locust_exporter
from locust_exporter import LocustExporter
from projectionist.api import ApiSettings, create_app
from projectionist.store.connection import connect
from projectionist.testing import free_port, poll_until
from tests.fix_api import ServedApp
from tests.helpers import ROOT

APPEND = "/streams/{aggregate_id}/events"


# --- what the users send ------------------------------------------------------


def test_uniform_keys_cover_the_key_space_evenly() -> None:
    config = loadgen.LoadConfig(keys=20, seed=7)
    picker = loadgen.KeyPicker(config)
    counts = collections.Counter(picker.pick() for _ in range(20_000))
    assert set(counts) == {f"load-{i}" for i in range(20)}
    assert max(counts.values()) < 1.25 * min(counts.values())


def test_zipf_keys_are_skewed_towards_the_first_ranks() -> None:
    config = loadgen.LoadConfig(keys=1000, distribution="zipf", zipf_s=1.2, seed=3)
    picker = loadgen.KeyPicker(config)
    counts = collections.Counter(picker.index() for _ in range(50_000))
    assert all(0 <= k < 1000 for k in counts)
    harmonic = sum(1 / r**1.2 for r in range(1, 1001))
    # Rank 1 gets 1/H of the draws; rank 2 gets 2**-1.2 of rank 1's.
    assert counts[0] / 50_000 == pytest.approx(1 / harmonic, rel=0.05)
    assert counts[1] / counts[0] == pytest.approx(2**-1.2, rel=0.1)
    assert counts[0] > counts[9] > counts[99]


def test_append_body_matches_the_api_contract() -> None:
    config = loadgen.LoadConfig(batch_size=3, event_type="E")
    body = loadgen.append_body(config, random.Random(1), "load-1")
    assert body["expected_version"] == "any"
    assert [e["type"] for e in body["events"]] == ["E"] * 3
    assert all(e["data"]["aggregate"] == "load-1" for e in body["events"])
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01", loadgen.traceparent(random.Random(2)))


def test_load_config_from_env_and_errors_name_the_variable() -> None:
    config = loadgen.LoadConfig.from_env(
        {
            "LOAD_KEYS": "50",
            "LOAD_DISTRIBUTION": "ZIPF",
            "LOAD_ZIPF_S": "0.9",
            "LOAD_BATCH_SIZE": "4",
            "LOAD_RATE": "100",
            "LOAD_USERS": "8",
            "LOAD_TRACE": "1",
            "API_TOKEN": "t",
        }
    )
    assert (config.keys, config.distribution, config.zipf_s, config.batch_size) == (50, "zipf", 0.9, 4)
    assert config.user_rate == 12.5
    assert config.trace
    assert config.api_token == "t"
    assert loadgen.LoadConfig.from_env({}) == loadgen.LoadConfig()
    assert loadgen.LoadConfig.from_env({"LOAD_SEED": "-7"}).seed == -7
    for env, message in [
        ({"LOAD_KEYS": "0"}, "LOAD_KEYS='0' must be at least 1"),
        ({"LOAD_BATCH_SIZE": "ten"}, "LOAD_BATCH_SIZE='ten' is not an integer"),
        ({"LOAD_DISTRIBUTION": "pareto"}, "LOAD_DISTRIBUTION='pareto' must be one of"),
        ({"LOAD_RATE": "-1"}, "LOAD_RATE='-1' must be a number >= 0"),
        ({"LOAD_SEED": "abc"}, "LOAD_SEED='abc' is not an integer"),
    ]:
        with pytest.raises(loadgen.LoadConfigError, match=re.escape(message)):
            loadgen.LoadConfig.from_env(env)


def test_thresholds() -> None:
    ok = loadgen.judge(1000, 5, 120.0, max_error_ratio=0.01, max_p95_ms=500)
    assert ok.ok
    errors = loadgen.judge(1000, 20, 120.0, max_error_ratio=0.01, max_p95_ms=500)
    assert errors.problems == ("error ratio 2.00% is above the 1.00% threshold",)
    slow = loadgen.judge(1000, 0, 800.0, max_error_ratio=0.01, max_p95_ms=500)
    assert slow.problems == ("p95 latency 800 ms is above the 500 ms threshold",)
    idle = loadgen.judge(0, 0, 0.0, max_error_ratio=0.01, max_p95_ms=500)
    assert not idle.ok


def test_step_ramp_adds_users_per_step_up_to_the_maximum() -> None:
    assert [loadgen.step_users(t, 2, 10.0, 7) for t in (0, 9.9, 10, 25, 30, 1000)] == [2, 2, 4, 6, 7, 7]


# --- the Prometheus exporter ------------------------------------------------------


def test_exporter_counts_failures_and_times_in_seconds() -> None:
    registry = CollectorRegistry()
    users = [3]
    exporter = LocustExporter(registry, lambda: users[0])
    exporter.on_request("POST", APPEND, 12.0, 100)
    exporter.on_request("POST", APPEND, 250.0, 0, exception=RuntimeError("409"))
    exporter.on_request("DB", "append", 4.0, 10, context={})
    labels = {"method": "POST", "name": APPEND}
    assert registry.get_sample_value("locust_requests_total", labels) == 2
    assert registry.get_sample_value("locust_request_failures_total", labels) == 1
    assert registry.get_sample_value("locust_request_duration_seconds_sum", labels) == pytest.approx(0.262)
    assert registry.get_sample_value("locust_request_duration_seconds_bucket", {**labels, "le": "0.025"}) == 1
    assert registry.get_sample_value("locust_requests_total", {"method": "DB", "name": "append"}) == 1
    assert registry.get_sample_value("locust_users") == 3
    users[0] = 9
    assert registry.get_sample_value("locust_users") == 9


def test_a_taken_metrics_port_leaves_the_load_running_without_metrics(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Two Locust processes on one host (a second run, --processes) both bind
    # 9646: the second must not die in events.init before any load.
    listeners: list[object] = []
    environment = types.SimpleNamespace(
        events=types.SimpleNamespace(request=types.SimpleNamespace(add_listener=listeners.append)),
        runner=None,
    )
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with caplog.at_level(logging.WARNING):
            assert locust_exporter.install(environment, port, host="127.0.0.1") is None
    assert listeners == []
    assert f"cannot serve on 127.0.0.1:{port}" in caplog.text and "LOAD_METRICS_PORT" in caplog.text
    free = free_port()
    assert locust_exporter.install(environment, free, host="127.0.0.1") is not None
    assert len(listeners) == 1 and "locust_users" in _scrape(free)


# --- real headless runs ------------------------------------------------------------------


def _runner(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("LOAD_", "API_"))}
    full_env.update(env or {})
    return subprocess.Popen(
        [sys.executable, "-m", "experiments.load", *args],
        cwd=ROOT,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
        return str(response.read().decode())


def _sample(text: str, name: str, labels: str = "") -> float | None:
    match = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


def _final_stats(out: Path) -> dict[tuple[str, str], tuple[int, int]]:
    """(method, name) -> (requests, failures), from the JSON Locust writes after the last user stopped."""
    entries = json.loads((out / "load.json").read_text())
    return {(e["method"], e["name"]): (e["num_requests"], e["num_failures"]) for e in entries}


def _events(db_url: str) -> int:
    with connect(db_url) as conn:
        row = conn.execute("SELECT count(*) FROM events").fetchone()
    return int(row[0]) if row else 0


@pytest.fixture
def out(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "out"


@pytest.mark.integration
@pytest.mark.slow
def test_http_smoke_run_against_the_real_api(db_url: str, out: Path) -> None:
    metrics_port = free_port()
    proc = _runner(
        "--database-url", db_url, "--out", str(out), "--duration", "8", "--users", "4",
        "--batch-size", "5", "--metrics-port", str(metrics_port), "--max-p95-ms", "2000",
    )  # fmt: skip
    scraped = ""

    def a_request_shows() -> bool:
        nonlocal scraped
        if proc.poll() is not None:
            return True  # Locust has ended: nothing more to scrape
        try:
            text = _scrape(metrics_port)
        except OSError:
            text = ""
        if (_sample(text, "locust_requests_total", f'{{method="POST",name="{APPEND}"}}') or 0) > 0:
            scraped = text
        return bool(scraped)

    # Scrape the exporter while Locust runs: its numbers must move.
    poll_until(a_request_shows, timeout=60, interval=0.2)
    output, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, output
    assert scraped, f"the exporter never showed a request:\n{output}"
    assert _sample(scraped, "locust_users") == 4
    assert "locust_request_duration_seconds_bucket" in scraped
    assert "thresholds met" in output
    requests, failures = _final_stats(out)[("POST", APPEND)]
    assert requests > 20
    assert failures == 0
    assert (out / "load.html").stat().st_size > 0
    with (out / "load_stats.csv").open() as f:
        assert {row["Name"] for row in csv.DictReader(f)} == {APPEND, "Aggregated"}
    # Every 201 was a committed batch of 5: the store holds exactly that.
    assert _events(db_url) == requests * 5


@pytest.mark.integration
@pytest.mark.slow
def test_database_user_smoke_run_commits_every_append(db_url: str, out: Path) -> None:
    proc = _runner(
        "--target", "db", "--shape", "step", "--database-url", db_url, "--out", str(out),
        "--duration", "5", "--users", "3", "--batch-size", "2", "--metrics-port", "0",
    )  # fmt: skip
    output, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, output
    stats = _final_stats(out)
    assert set(stats) == {("DB", "append")}
    requests, failures = stats[("DB", "append")]
    assert requests > 10
    assert failures == 0
    assert _events(db_url) == requests * 2


@pytest.mark.integration
@pytest.mark.slow
def test_run_fails_when_the_error_ratio_passes_the_threshold(db_url: str, out: Path) -> None:
    # The API wants a token the load does not send: every request is a 401.
    app = create_app(db_url, ApiSettings(token="not-given-to-locust"), registry=CollectorRegistry())
    with ServedApp(app) as served:
        proc = _runner(
            "--host", served.url, "--out", str(out), "--duration", "3", "--users", "2",
            "--metrics-port", "0",
        )  # fmt: skip
        output, _ = proc.communicate(timeout=90)
    assert proc.returncode == 1, output
    assert "thresholds exceeded" in output
    assert "error ratio 100.00% is above the 1.00% threshold" in output
    assert _events(db_url) == 0
