"""The scaling experiment: its arithmetic on made-up samples, its sampler on a real store, a real run."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from experiments import report
from experiments.report import Phase, Sample
from experiments.sampling import PartitionSample, StoreSample, sample_store
from experiments.scale import plan
from experiments.verify import verify_rescaled
from psycopg import sql

from projectionist.demo.sample_projection import ScalableProjection
from projectionist.partitioning import partition_of
from projectionist.records import NewEvent
from projectionist.store.appending import append
from projectionist.store.connection import Connection
from projectionist.testing import PostgresServer
from tests.helpers import ROOT


def store(head: int, *parts: tuple[int, int, float]) -> StoreSample:
    return StoreSample(head, tuple(PartitionSample(k, *p) for k, p in enumerate(parts)))


def test_plan_adds_then_removes_then_drains() -> None:
    phases = plan(3, remove=True)
    assert [p.workers for p in phases] == [(0,), (0, 1), (0, 1, 2), (0, 1), (0,), (0, 1, 2, 3)]
    assert [p.added for p in phases] == [0, 1, 2, None, None, None]
    assert [p.removed for p in phases] == [None, None, None, 2, 1, None]
    assert [p.load for p in phases] == [True] * 5 + [False]
    assert [p.workers for p in plan(2, remove=False)] == [(0,), (0, 1), (0, 1, 2, 3)]
    rescaled = plan(2, remove=True, rescale_to=3)
    assert [(p.workers, p.total, p.rescale) for p in rescaled[-2:]] == [
        ((0, 1, 2), 3, True),
        ((0, 1, 2), 3, False),
    ]
    assert plan(2, remove=True, rescale_to=4) == plan(2, remove=True)


def test_summary_rates_shares_lag_percentiles_catch_up_and_cpu() -> None:
    phases = [Phase("1 worker", (0,), added=0), Phase("2 workers", (0, 1), added=1)]
    samples = [
        # t, phase, running, store(head, (processed, lag events, lag s) per partition), cpu
        Sample(0.0, 0, (0,), store(0, (0, 0, 0.0), (0, 0, 0.0)), 0.0, 0.0, {"api": 0.0, "workers": 0.0}),
        Sample(1.0, 0, (0,), store(100, (50, 0, 0.2), (0, 50, 1.0)), 1.5, 2.0, {"api": 0.5, "workers": 0.5}),
        Sample(
            2.0, 0, (0,), store(200, (100, 0, 0.2), (0, 100, 2.0)), 3.0, 4.0, {"api": 1.0, "workers": 1.0}
        ),
        Sample(
            3.0, 1, (0, 1), store(300, (150, 0, 0.1), (0, 150, 3.0)), 5.0, 6.0, {"api": 1.5, "workers": 1.5}
        ),
        Sample(
            4.0, 1, (0, 1), store(400, (200, 0, 0.1), (120, 80, 2.0)), 7.0, 8.0, {"api": 2.0, "workers": 2.5}
        ),
        Sample(
            5.0, 1, (0, 1), store(500, (250, 0, 0.1), (250, 0, 0.5)), 9.0, 10.0, {"api": 2.5, "workers": 3.5}
        ),
    ]
    first, second = report.summarize(samples, phases, [0.0, 2.5], 5.0, max_lag_seconds=1.0)
    assert first.append_rate == 100.0
    assert first.worker_rates == (50.0, 0.0)
    assert first.shares == (1.0, 0.0)
    assert (first.lag_events_p50, first.lag_events_max) == (50, 100)
    assert (first.lag_seconds_p50, first.lag_seconds_max) == (1.0, 2.0)
    assert first.catch_up == 1.0  # no backlog, but caught up only once it applied events
    assert first.cpu_busy == 0.75
    assert first.cpu_cores["api"] == 0.5
    assert first.cpu_cores["other"] == pytest.approx(0.5)  # 1.5 cores busy, 1.0 ours
    # Phase 2 runs from t=3 to t=5: worker 1 applies its backlog.
    assert second.append_rate == 100.0
    assert second.worker_rates == (50.0, 125.0)
    assert second.shares == pytest.approx((100 / 350, 250 / 350))
    assert second.lag_events_max == 150
    assert second.catch_up == 2.5  # started at 2.5, lag 0.5 s at t=5
    table = report.markdown_table([first, second])
    assert "| 2 workers | 100 | 50 (29%) | 125 (71%) | 80 / 150 | 2.0 / 3.0 | w1: 2.5 s | 100% |" in table
    assert "| 1 worker | 100 | 50 (100%) | - |" in table


def test_catch_up_is_the_first_sample_within_the_threshold_or_none() -> None:
    phases = [Phase("1 worker", (0,), added=0)]
    # Lag falls from 3.5 s to 0.5 s, one second per sample.
    samples = [Sample(float(t), 0, (0,), store(t, (t, 3 - t, 3.5 - t)), 0.0, 0.0) for t in range(4)]
    (summary,) = report.summarize(samples, phases, [0.0], 3.0, max_lag_seconds=1.0)
    assert summary.catch_up == 3.0
    (from_later,) = report.summarize(samples, phases, [0.5], 3.0, max_lag_seconds=1.5)
    assert from_later.catch_up == 1.5  # t=2 (lag 1.5 s) minus the start 0.5
    (never,) = report.summarize(samples, phases, [0.0], 3.0, max_lag_seconds=0.25)
    assert never.catch_up is None
    assert "w0: not within the run" in report.markdown_table([never])


def test_catch_up_waits_for_the_worker_to_apply_something() -> None:
    # The sample taken as the worker starts finds a young backlog (the load
    # has just begun); the lag then grows while the process starts up.
    phases = [Phase("1 worker", (0,), added=0)]
    samples = [
        Sample(float(t), 0, (0,), store(100 * t, (processed, 50, lag)), 0.0, 0.0)
        for t, (processed, lag) in enumerate([(0, 0.3), (0, 1.3), (0, 2.3), (200, 0.4)])
    ]
    (summary,) = report.summarize(samples, phases, [0.0], 3.0, max_lag_seconds=1.0)
    assert summary.catch_up == 3.0


def test_outputs_are_written(tmp_path: Path) -> None:
    phases = [Phase("1 worker", (0,), added=0), Phase("drain (no load)", (0, 1), load=False)]
    samples = [
        Sample(
            float(t),
            0 if t < 3 else 1,
            (0,),
            store(t * 10, (t * 5, 3, 0.5), (0, t * 5, float(t))),
            t,
            2.0 * t,
        )
        for t in range(6)
    ]
    summaries = report.summarize(samples, phases, [0.0, 3.0], 5.0)
    report.write_samples_csv(samples, phases, tmp_path / "s.csv")
    report.write_phases_csv(summaries, tmp_path / "p.csv")
    report.plot(samples, phases, [0.0, 3.0], tmp_path / "c.png", title="t", target_rate=10.0)
    rows = list(csv.DictReader((tmp_path / "s.csv").open()))
    assert [r["phase"] for r in rows] == ["1 worker"] * 3 + ["drain (no load)"] * 3
    assert rows[2]["w1_lag_events"] == "10"
    assert rows[2]["append_rate"] == "10.0"
    assert [r["phase"] for r in csv.DictReader((tmp_path / "p.csv").open())] == [
        "1 worker",
        "drain (no load)",
    ]
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.integration
def test_sampler_counts_lag_of_partitions_without_a_worker(conn: Connection) -> None:
    ids = [f"agg-{i}" for i in range(40)]
    for aggregate_id in ids:
        append(conn, aggregate_id, [NewEvent("E", {}), NewEvent("E", {})])
    sampled = sample_store(conn, 4)
    expected = [2 * sum(1 for a in ids if partition_of(a, 4) == k) for k in range(4)]
    assert [p.lag_events for p in sampled.partitions] == expected
    assert all(p.processed == 0 for p in sampled.partitions)
    assert all(p.lag_seconds >= 0 for p in sampled.partitions)
    assert sampled.head == 80
    assert sampled.lag_events == 80


def _ignore_sigint() -> None:  # runs in the child
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _without_locust_tables(output: str, keep: int = 60) -> str:
    """The harness's own lines, without Locust's periodic stats tables that bury its error."""
    noise = ("Type ", "----", "POST ", "GET ", "Aggregated", "Response time", "# reqs")
    lines = [line for line in output.splitlines() if line.strip() and not line.lstrip().startswith(noise)]
    return "\n".join(lines[-keep:])


@pytest.mark.integration
@pytest.mark.slow
def test_a_load_run_that_fails_its_thresholds_fails_the_experiment(
    pg_server: PostgresServer, tmp_path: Path
) -> None:
    # Locust exits 1 when appends failed beyond LOAD_MAX_ERROR_RATIO; the
    # experiment must not take that as success. An unreachable request floor
    # makes Locust fail its verdict here without breaking the appends.
    database = f"t_scale_{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOAD_", "API_", "WORKER_", "TOTAL_"))}
    env.update(DATABASE_URL=pg_server.admin_url, LOAD_MIN_REQUESTS="1000000000")
    try:
        args = [
            "--step-seconds", "2", "--max-workers", "1", "--no-remove", "--rescale-to", "0", "--rate", "200",
            "--users", "1", "--keys", "50", "--database", database,
            "--out", str(tmp_path / "results"), "--scratch", str(tmp_path / "scratch"),
        ]  # fmt: skip
        result = subprocess.run(
            [sys.executable, "-m", "experiments.scale", *args],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=180,
        )  # fmt: skip
    finally:
        with pg_server.admin() as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database)))
    assert result.returncode == 1, _without_locust_tables(result.stdout + result.stderr)
    assert "the load run failed: " in result.stderr and "at least 1000000000 required" in result.stderr
    # The data itself is still verified (not its shares: too few keys to balance).
    assert "PASS  every event applied exactly once" in result.stdout
    markdown = (tmp_path / "results" / "scale-experiment.md").read_text()
    assert "**The load run failed Locust's thresholds:**" in markdown


@pytest.mark.integration
@pytest.mark.slow
def test_a_short_real_experiment_verifies_and_writes_its_results(
    pg_server: PostgresServer, tmp_path: Path
) -> None:
    database = f"t_scale_{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOAD_", "API_", "WORKER_", "TOTAL_"))}
    env["DATABASE_URL"] = pg_server.admin_url
    try:
        args = [
            "--step-seconds", "3", "--max-workers", "2", "--no-remove", "--rate", "400", "--users", "2",
            "--keys", "200", "--database", database,
            "--out", str(tmp_path / "results"), "--scratch", str(tmp_path / "scratch"),
        ]  # fmt: skip
        result = subprocess.run(
            [sys.executable, "-m", "experiments.scale", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
            # As a background job of a script (`make scale-experiment &`):
            # SIGINT ignored, which the harness must not pass on to Locust,
            # whose stop signal it is.
            preexec_fn=_ignore_sigint,
        )
    finally:
        with pg_server.admin() as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database)))
    assert result.returncode == 0, _without_locust_tables(result.stdout + result.stderr)
    assert "PASS: all" in result.stdout
    results = tmp_path / "results"
    markdown = (results / "scale-experiment.md").read_text()
    assert "| 1 worker |" in markdown and "| 2 workers |" in markdown and "| drain (no load) |" in markdown
    assert "PASS  every event applied exactly once" in markdown
    assert "PASS  per-aggregate order preserved" in markdown
    assert "PASS  each aggregate handled only by its owner under 4 and under 2 partitions" in markdown
    phases = list(csv.DictReader((results / "scale-experiment-phases.csv").open()))
    assert [(p["phase"], p["partitions"]) for p in phases] == [
        ("1 worker", "4"),
        ("2 workers", "4"),
        ("rescaled to 2 partitions, 2 workers", "2"),
        ("drain (no load)", "2"),
    ]
    assert float(phases[0]["append_events_per_s"]) > 0
    assert (results / "scale-experiment.png").stat().st_size > 10_000
    assert len(list(csv.DictReader((results / "scale-experiment.csv").open()))) >= 6


@pytest.mark.integration
def test_rescaled_verification_passes_only_for_a_correct_read_model(conn: Connection) -> None:
    ScalableProjection().setup(conn)
    ids = [f"agg-{i}" for i in range(12)]
    for aggregate_id in ids:
        append(conn, aggregate_id, [NewEvent("E", {}), NewEvent("E", {})])
    insert = (
        "INSERT INTO scalable_projection_aggregates "
        "(aggregate_id, event_count, last_version, worker_id, total_workers, workers) "
        "VALUES (%s, %s, %s, %s, 2, %s)"
    )
    for aggregate_id in ids:
        old, new = partition_of(aggregate_id, 4), partition_of(aggregate_id, 2)
        conn.execute(insert, (aggregate_id, 2, 2, new, sorted({old, new})))
    good = verify_rescaled(conn, 4, 2)
    assert good.ok, good.checks
    assert sum(s.events for s in good.shares) == 24
    # One event applied twice, and one aggregate on a worker that owns it under neither count.
    conn.execute("UPDATE scalable_projection_aggregates SET event_count = 3 WHERE aggregate_id = 'agg-0'")
    stray = next(k for k in range(4) if k not in {partition_of("agg-1", 4), partition_of("agg-1", 2)})
    conn.execute(
        "UPDATE scalable_projection_aggregates SET workers = %s WHERE aggregate_id = 'agg-1'", ([stray],)
    )
    bad = verify_rescaled(conn, 4, 2)
    assert [c.ok for c in bad.checks] == [False, True, False]
    assert "agg-0 (2 stored, 3 applied)" in bad.checks[0].detail
