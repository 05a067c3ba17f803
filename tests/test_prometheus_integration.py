"""A real Prometheus scrapes real worker processes under load; every answer comes from its HTTP API.

Uses the session's ``prometheus_stack`` (tests/fix_prometheus.py): 2 worker
subprocesses, a load generator, Debian's prometheus with a 1 s scrape.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.fix_prometheus import PROJECTION, SCRAPE_JOB, PrometheusStack
from tests.helpers import ROOT
from tests.test_dashboards import label_values_promql

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SELECTOR = f'projection="{PROJECTION}"'


def test_workers_are_up_and_process_under_load(prometheus_stack: PrometheusStack) -> None:
    stack = prometheus_stack
    up = stack.query(f'up{{job="{SCRAPE_JOB}"}}')
    assert sorted(s.labels["instance"] for s in up) == sorted(
        f"127.0.0.1:{w.port}" for w in stack.workers.values()
    )
    assert all(s.value == 1 for s in up)

    # events/s is a rate() over the counter, per worker, while the load runs.
    rates = stack.wait_until(
        f"rate(projectionist_events_processed_total{{{SELECTOR}}}[5s])",
        lambda r: len(r) == stack.total_workers and all(s.value > 0 for s in r),
        what="every worker to process events",
    )
    assert {s.labels["worker"] for s in rates} == {"0", "1"}

    # Both processes report the lag of both partitions (kafka-lag-exporter style).
    lag_series = stack.query(f"projectionist_lag_events{{{SELECTOR}}}")
    assert {(s.labels["instance"], s.labels["worker"]) for s in lag_series} == {
        (f"127.0.0.1:{w.port}", str(k)) for w in stack.workers.values() for k in range(stack.total_workers)
    }
    owned = stack.query(f"projectionist_partition_owned{{{SELECTOR}}} == 1")
    assert sorted(s.labels["worker"] for s in owned) == ["0", "1"]


def test_processed_events_match_appended_and_lag_returns_to_zero(prometheus_stack: PrometheusStack) -> None:
    stack = prometheus_stack
    # Counters live in the processes: the sum matches the store only while none has restarted
    # (this module's stop/restart test runs after this one).
    assert stack.restarts == 0, "a worker was restarted earlier in the session"
    stack.load.pause()
    try:
        appended = stack.appended()
        assert appended > 0
        stack.wait_until(
            f"max by (projection, worker) (projectionist_lag_events{{{SELECTOR}}})",
            lambda r: len(r) == stack.total_workers and all(s.value == 0 for s in r),
            what="lag_events to reach 0 after catch-up",
        )
        stack.wait_until(
            f"sum(projectionist_events_processed_total{{{SELECTOR}}})",
            lambda r: len(r) == 1 and r[0].value == appended,
            what=f"the processed sum to equal the {appended} appended events",
        )
        # Caught up: lag in seconds is exactly 0, not "a little".
        lag_seconds = stack.query(f"max by (worker) (projectionist_lag_seconds{{{SELECTOR}}})")
        assert [s.value for s in lag_seconds] == [0.0] * stack.total_workers
        head = stack.value(f"max(projectionist_head_position{{{SELECTOR}}})")
        assert head is not None and head >= appended
    finally:
        stack.load.resume()


def test_stopped_worker_shows_lag_seconds_through_its_sibling(prometheus_stack: PrometheusStack) -> None:
    stack = prometheus_stack
    stopped = 1
    stopped_instance = f"127.0.0.1:{stack.workers[stopped].port}"
    try:
        assert stack.stop_worker(stopped) == 0  # a graceful SIGTERM stop
        stack.wait_until(
            f'up{{instance="{stopped_instance}"}}',
            lambda r: len(r) == 1 and r[0].value == 0,
            what="Prometheus to see the stopped worker down",
        )
        # The load keeps appending; worker 0's collector reports partition 1 falling behind.
        lag = stack.wait_until(
            f'max by (worker) (projectionist_lag_seconds{{{SELECTOR}, worker="{stopped}"}})',
            lambda r: len(r) == 1 and r[0].value > 0,
            what="lag_seconds of the stopped partition to rise above 0",
        )
        assert lag[0].value > 0
        events_behind = stack.value(
            f'max by (worker) (projectionist_lag_events{{{SELECTOR}, worker="{stopped}"}})'
        )
        assert events_behind is not None and events_behind > 0
        # Coverage: the stopped partition has no owner, the running one does.
        uncovered = stack.query(
            f"max by (projection, worker) (projectionist_lag_events{{{SELECTOR}}}) "
            f"unless on (projection, worker) "
            f"(max by (projection, worker) (projectionist_partition_owned{{{SELECTOR}}}) == 1)"
        )
        assert [s.labels["worker"] for s in uncovered] == [str(stopped)]
        # The dashboard's $worker menu still offers the stopped partition.
        offered = stack.query(worker_variable_promql())
        assert sorted(s.labels["worker"] for s in offered) == ["0", "1"]
        # Worker 0 is still live and at 0 lag seconds or close: the lag is partition 1's alone.
        running_up = stack.value(f'up{{instance="127.0.0.1:{stack.workers[0].port}"}}')
        assert running_up == 1
    finally:
        stack.start_worker(stopped)
    stack.wait_until(
        f'max by (worker) (projectionist_lag_events{{{SELECTOR}, worker="{stopped}"}}) < 1000',
        lambda r: len(r) == 1,
        what="the restarted worker to catch up",
    )
    stack.wait_until(
        f'up{{instance="{stopped_instance}"}}',
        lambda r: len(r) == 1 and r[0].value == 1,
        what="the restarted worker to be scraped again",
    )


def test_rules_load_and_exemplars_reach_prometheus(prometheus_stack: PrometheusStack) -> None:
    stack = prometheus_stack
    groups = stack.api("rules")["groups"]
    rules = {rule["name"]: rule for group in groups for rule in group["rules"]}
    assert "ProjectionistWorkerStalled" in rules
    assert all(rule["health"] == "ok" for rule in rules.values()), rules

    # Workers export spans, so batch durations carry trace_id exemplars that Prometheus stores.
    text = stack.metrics_text(0)
    assert re.search(
        r'projectionist_batch_duration_seconds_bucket\{.*\} \d+\.0 # \{trace_id="[0-9a-f]{32}"\}', text
    )
    now = stack.query("time()")[0].value
    data = stack.wait_until_exemplars(
        f"projectionist_batch_duration_seconds_bucket{{{SELECTOR}}}", start=now - 300, end=now + 60
    )
    assert all(re.fullmatch(r"[0-9a-f]{32}", e["labels"]["trace_id"]) for d in data for e in d["exemplars"])


def worker_variable_promql() -> str:
    """The workers dashboard's ``$worker`` query, as PromQL, with ``$projection`` set to the stack's."""
    dashboard = json.loads((ROOT / "compose/grafana/dashboards/projection-workers.json").read_text())
    (variable,) = [v for v in dashboard["templating"]["list"] if v["name"] == "worker"]
    promql, _ = label_values_promql(variable["query"].replace("$projection", PROJECTION))
    return promql
