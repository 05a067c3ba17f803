"""``python -m chaos.elastic_bench`` (``make elastic-bench``): elastic mode's targets, measured.

Runs :func:`chaos.elastic.run_elastic` three times (each on a cluster and a
network namespace of its own) and prints the targets table: for each
measure the value of every run (a p95 or p99 over that run's changes, as
the target says) and their median, a shortfall shown as such with its
cause. Written to ``out/elastic-bench/elastic-bench.md``; ``--publish``
copies it to ``docs/results/``.
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from chaos import partition_cost
from chaos.elastic import FULL, QUICK, ElasticProfile, ElasticRun, run_elastic
from chaos.netns import why_unavailable
from chaos.report import machine_description
from projectionist.testing.reports import add_output_flags, publish

EXIT_OK = 0
EXIT_FAILED = 1


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest rank: the smallest value that at least ``p`` percent of ``values`` do not exceed."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


@dataclass(frozen=True, slots=True)
class Target:
    """One row of the targets table."""

    measure: str
    target: str
    anchors: str
    #: Per run: the run's value (None: not measured), the unit shown after it.
    value: Callable[[ElasticRun], float | None]
    unit: str
    #: Whether a value meets the target.
    meets: Callable[[float, ElasticRun], bool]
    #: Why a value that misses it does.
    cause: str = ""


def _joins(run: ElasticRun) -> list[float]:
    return [c.seconds for c in run.changes if c.kind == "join"]


def _leaves(run: ElasticRun) -> list[float]:
    return [c.seconds for c in run.changes if c.kind == "leave"]


def _worst_moves(run: ElasticRun) -> float | None:
    """The largest moves - bound over the run's changes (0 or less meets the target)."""
    return max((c.moves - c.bound for c in run.changes), default=None)


TARGETS = (
    Target(
        "A joining worker holds its fair share (±1 partition), from its process's start",
        "≤ 5 s p95",
        "pupsourcing/core about 10-20 s; Axon and Marten do not rebalance by themselves",
        lambda r: percentile(_joins(r), 95),
        "s",
        lambda v, r: v <= 5.0,
        "a worker process starts Python and imports its projection first (about 1 s of it)",
    ),
    Target(
        "Graceful leave (SIGTERM): its partitions re-owned",
        "≤ 2 s p95",
        "Axon's release back-off is 10 s",
        lambda r: percentile(_leaves(r), 95),
        "s",
        lambda v, r: v <= 2.0,
        "the others take them at their next look (REBALANCE_INTERVAL), and one more confirms the member list",
    ),
    Target(
        "A killed worker (kill -9): its partitions re-owned",
        "≤ 3 s p99",
        "Axon 10-15 s, pupsourcing about 40 s, Kafka's default session timeout 45 s",
        lambda r: percentile(r.kills, 99),
        "s",
        lambda v, r: v <= 3.0,
        "no notification comes from a killed process: the others see it at their next look",
    ),
    Target(
        "A host cut off from the network: its partitions re-owned",
        "≤ 15 s",
        "Kafka 45 s",
        lambda r: r.cut_seconds,
        "s",
        lambda v, r: v <= 15.0,
        "the server drops the session after its TCP keepalives (5 s, then 3 probes 2 s apart) or "
        "tcp_user_timeout (10 s)",
    ),
    Target(
        "... and the cut-off worker commits nothing after losing them",
        "0 events",
        "",
        lambda r: None if r.cut_commits_after is None else float(r.cut_commits_after),
        "events",
        lambda v, r: v == 0,
    ),
    Target(
        "Processing gap of partitions that do not move, during a rebalance (longest append-to-apply "
        "delay of their events)",
        "< one poll interval",
        "eager Kafka stops the world",
        lambda r: max(r.gaps, default=None),
        "s",
        lambda v, r: v < r.poll_interval,
        "a move's partitions are taken up (setup, checkpoint) on the member's one connection, "
        "between batches",
    ),
    Target(
        "Moves for one join or leave, minus the bound ceil(P/N) + 1 (worst change)",
        "≤ 0",
        "",
        _worst_moves,
        "",
        lambda v, r: v <= 0,
        "members that joined or left at nearly the same moment",
    ),
)


def _shown(value: float | None, unit: str) -> str:
    if value is None:
        return "not measured"
    if unit == "s":
        return f"{value:.2f} s"
    if unit == "events":
        return f"{value:.0f}"
    return f"{value:+.0f}" if unit == "" else f"{value:g} {unit}"


def targets_table(runs: Sequence[ElasticRun]) -> list[str]:
    """The targets table: each run's value, the median of the runs, and whether it meets the target."""
    lines = [
        "| Measure | Target | "
        + " | ".join(f"run {i + 1}" for i in range(len(runs)))
        + " | Median | Result |",
        "|---|---|" + "---|" * len(runs) + "---|---|",
    ]
    notes: list[str] = []
    for t in TARGETS:
        values = [t.value(r) for r in runs]
        measured = [v for v in values if v is not None]
        median = statistics.median(measured) if measured else None
        if median is None:
            reason = next((r.cut_unavailable for r in runs if r.cut_unavailable), "")
            result = "not measured" + (f" ({reason})" if reason else "")
        elif all(t.meets(v, r) for v, r in zip(values, runs, strict=True) if v is not None):
            result = "meets"
        elif t.meets(median, runs[0]):
            result = "meets (median); missed in a run"
            notes.append(f"{t.measure}: missed in a run: {t.cause}")
        else:
            result = "**shortfall**"
            notes.append(f"{t.measure}: shortfall: {t.cause}")
        cells = [_shown(v, t.unit) for v in values]
        lines.append(
            f"| {t.measure} | {t.target} | " + " | ".join(cells) + f" | {_shown(median, t.unit)} | {result} |"
        )
    lost = sum(r.fold.lost for r in runs if r.fold)
    duplicated = sum(r.fold.duplicated for r in runs if r.fold)
    events = sum(r.fold.events for r in runs if r.fold)
    faults = "; ".join(_faults(r) for r in runs[:1])
    exact = all(r.fold is not None and r.fold.exact for r in runs)
    lines.append(
        f"| Correctness: lost and duplicated, per run: {faults}, under load | 0 and 0 | "
        + " | ".join(
            f"{r.fold.lost} / {r.fold.duplicated} of {r.fold.events:,}" if r.fold else "no fold" for r in runs
        )
        + f" | {lost} / {duplicated} of {events:,} | {'meets' if exact else '**shortfall**'} |"
    )
    return lines + ([""] + [f"- {n}" for n in notes] if notes else [])


def _faults(run: ElasticRun) -> str:
    joins = sum(c.kind == "join" for c in run.changes)
    leaves = sum(c.kind == "leave" for c in run.changes)
    cut = "one host cut off" if run.cut_seconds is not None else "no host cut (not available)"
    return (
        f"{joins} joins and {leaves} leaves, {len(run.kills)} kill -9, "
        f"{len(run.restarts)} PostgreSQL restart(s), {cut}"
    )


def context_lines(runs: Sequence[ElasticRun]) -> list[str]:
    """What the targets table leaves out: settle times, the moved partitions' pause, restarts, load."""

    def each(f: Callable[[ElasticRun], float | None]) -> str:
        return ", ".join(_shown(f(r), "s") for r in runs)

    def settle(kind: str) -> Callable[[ElasticRun], float | None]:
        return lambda r: percentile([c.settle_seconds for c in r.changes if c.kind == kind], 95)

    return [
        f"- Until every member held exactly its share, after a join (p95 per run): {each(settle('join'))}; "
        f"after a leave: {each(settle('leave'))}",
        f"- Longest append-to-apply delay of the partitions that moved, during their move: "
        f"{each(lambda r: max(r.moved_gaps, default=None))}; "
        f"with nothing moving: {each(lambda r: r.quiet_gap)}",
        "- A checkpoint update without and with the lock fence (median, under the run's load): "
        + "; ".join(
            f"{r.fence_cost_us[0]:.0f} µs and {r.fence_cost_us[1]:.0f} µs" if r.fence_cost_us else "-"
            for r in runs
        ),
        f"- Every partition owned again after the database restart, once it was back: "
        f"{each(lambda r: max(r.restarts, default=None))}",
        "- Moves per change (moves / bound): "
        + "; ".join(", ".join(f"{c.moves}/{c.bound}" for c in r.changes) for r in runs[:1])
        + " (run 1)",
        "- Load average at the end of each run (1, 5, 15 min): "
        + "; ".join(" ".join(f"{x:.2f}" for x in r.load_average) for r in runs),
        "- Run durations: " + ", ".join(f"{r.duration_seconds:.0f} s" for r in runs),
    ]


def render(
    runs: Sequence[ElasticRun],
    profile: ElasticProfile,
    server_version: str,
    cost: partition_cost.PartitionCost | None = None,
) -> str:
    when = datetime.now(UTC)
    lines = [
        "# Elastic mode: the targets, measured (`make elastic-bench`)",
        "",
        f"- Date: {when.strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Machine: {machine_description(server_version)}; shared with other work, see the load averages",
        f"- Profile: {profile.name}: {profile.partitions} partitions, {profile.min_members} to "
        f"{profile.max_members} members, append load {profile.load_rate:g} events/s, POLL_INTERVAL "
        f"{profile.poll_interval:g} s, REBALANCE_INTERVAL {profile.rebalance_interval:g} s; "
        f"{len(runs)} runs, each on a PostgreSQL cluster of its own",
        "",
        *targets_table(runs),
        "",
        "Each run's value is the percentile the target names over that run's changes (nearest rank: "
        "with ten joins, p95 is the slowest), and the median is over the runs. Times are read from "
        "the server's locks every 50 ms, so they are late by up to 50 ms.",
        "",
        "## Context",
        "",
        *context_lines(runs),
        "",
        *(["## What a partition costs", "", *partition_cost.lines(cost), ""] if cost is not None else []),
        "## Checks per run",
        "",
    ]
    for i, r in enumerate(runs):
        lines += [f"### Run {i + 1}: {'PASS' if r.ok else 'FAIL'}", "", *(f"- {c}" for c in r.checks)]
        if r.error:
            lines += ["", "```", r.error, "```"]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m chaos.elastic_bench", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="one short run (the CI profile), about 2 minutes"
    )
    parser.add_argument(
        "--runs", type=int, default=None, help="runs to take the median of (default 3; quick 1)"
    )
    add_output_flags(parser, "elastic-bench")
    parser.add_argument(
        "--keep-logs", action="store_true", help="keep the workers' logs even when every run passed"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    profile = QUICK if args.quick else FULL
    count = args.runs or (1 if args.quick else 3)
    reason = why_unavailable()
    if reason:
        print(f"the host cut-off is not measured: {reason}", flush=True)
    log_root = Path(tempfile.mkdtemp(prefix="projectionist-elastic-"))
    runs: list[ElasticRun] = []
    started = time.monotonic()
    for i in range(count):
        print(f"== run {i + 1} of {count} ({profile.name})", flush=True)
        run = run_elastic(profile, log_root / f"run-{i + 1}", seed=i + 1)
        print(run.explain(), f"({run.duration_seconds:.0f} s)", sep="\n", flush=True)
        runs.append(run)
    version = _server_version()
    cost = None if args.quick else partition_cost.measure()
    text = render(runs, profile, version, cost)
    print()
    print("\n".join(targets_table(runs)))
    print(f"\n{sum(r.ok for r in runs)}/{len(runs)} runs passed in {time.monotonic() - started:.0f} s")
    args.out.mkdir(parents=True, exist_ok=True)
    report = args.out / "elastic-bench.md"
    report.write_text(text)
    print(f"results written to {report}")
    if args.publish:
        print(f"published: {', '.join(map(str, publish([report])))}")
    ok = all(r.ok for r in runs)
    if ok and not args.keep_logs:
        shutil.rmtree(log_root, ignore_errors=True)
    else:
        print(f"workers' logs: {log_root}")
    return EXIT_OK if ok else EXIT_FAILED


def _server_version() -> str:
    from projectionist.store.embedded import bundled_binary

    postgres = bundled_binary("postgres")
    if postgres is None:
        return "unknown"
    out = subprocess.run([str(postgres), "--version"], capture_output=True, text=True, check=False).stdout
    return out.strip().rsplit(" ", 1)[-1] or "unknown"


if __name__ == "__main__":
    sys.exit(main())
