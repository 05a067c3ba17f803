"""The freshness indicator, the objective's rules and the triage rules, evaluated by a real Prometheus.

Uses the session's ``prometheus_stack`` (tests/fix_prometheus.py): real
workers under load, postgres_exporter, and every shipped rule file loaded.
"""

from __future__ import annotations

import math
import re

import pytest

from tests.fix_prometheus import PROJECTION, PrometheusStack

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SELECTOR = f'projection="{PROJECTION}"'


def test_the_delay_histogram_counts_every_applied_event_and_carries_trace_exemplars(
    prometheus_stack: PrometheusStack,
) -> None:
    stack = prometheus_stack
    applied = stack.wait_until(
        f"sum(projectionist_apply_delay_seconds_count{{{SELECTOR}}})",
        lambda r: len(r) == 1 and r[0].value > 0,
        what="delays to be counted",
    )[0].value
    processed = stack.value(f"sum(projectionist_events_processed_total{{{SELECTOR}}})")
    # Every applied event is one observation (scraped at slightly different moments).
    assert processed is not None and abs(processed - applied) <= 0.2 * processed + 100
    # Under this light load nearly every event meets the 5 s threshold.
    late = stack.wait_until(
        f"projectionist:freshness_errors:ratio_rate5m{{{SELECTOR}}}",
        lambda r: len(r) == 1,
        what="the 5-minute error ratio",
    )[0].value
    assert 0 <= late < 0.05
    text = stack.metrics_text(0)
    assert re.search(
        r'projectionist_apply_delay_seconds_bucket\{.*\} \d+\.0 # \{trace_id="[0-9a-f]{32}"\} [0-9.e-]+', text
    )
    now = stack.query("time()")[0].value
    data = stack.wait_until_exemplars(
        f"projectionist_apply_delay_seconds_bucket{{{SELECTOR}}}", start=now - 300, end=now + 60
    )
    assert all(re.fullmatch(r"[0-9a-f]{32}", e["labels"]["trace_id"]) for d in data for e in d["exemplars"])


def test_the_objective_and_the_budget_are_recorded(prometheus_stack: PrometheusStack) -> None:
    stack = prometheus_stack
    assert stack.value("projectionist:freshness_objective:ratio") == 0.99
    assert stack.value("projectionist:freshness_threshold:seconds") == 5
    # Evaluated once a minute: wait for its first evaluation.
    remaining = stack.wait_until(
        f"projectionist:freshness_budget_remaining:ratio30d{{{SELECTOR}}}",
        lambda r: len(r) == 1,
        what="the budget left",
        timeout=90,
    )[0].value
    assert math.isfinite(remaining) and remaining <= 1


def test_a_healthy_fleet_under_load_has_every_partition_ok(prometheus_stack: PrometheusStack) -> None:
    stack = prometheus_stack
    causes = stack.wait_until(
        f"projectionist:partition_cause{{{SELECTOR}}}",
        lambda r: len(r) == stack.total_workers and all(s.labels["cause"] == "ok" for s in r),
        what="every partition's cause to be ok",
        timeout=90,
    )
    assert sorted(s.labels["worker"] for s in causes) == [str(k) for k in range(stack.total_workers)]
    assert all(s.value == 0 for s in causes)
    # The signals behind it: the workers' busy share and their cost per event are recorded.
    busy = stack.query(f"projectionist:partition_busy:ratio_rate1m{{{SELECTOR}}}")
    assert len(busy) == stack.total_workers and all(0 <= s.value < 0.8 for s in busy)
    assert stack.query(f"projectionist:partition_seconds_per_event:rate1m{{{SELECTOR}}}")
