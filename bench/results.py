"""What a run measured, the targets it is judged by, and the one Markdown report.

The console shows exactly the Markdown written to ``out/bench/``. Every
target is listed with its measured ratio and ``ok`` or ``MISS``; a target whose
inputs were not measured says ``not measured`` and why, never ``ok``.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from bench.data import SERVER_ONLY_AGGREGATES_PER_CLIENT, SERVER_ONLY_STATEMENTS

CONTESTANTS = [
    "raw",
    "raw_unnest",
    "raw_copy",
    "projectionist",
    "projectionist_exact",
    "projectionist_notify",
    "eventsourcing",
    "messagedb",
]
LABELS = {
    "raw": "raw psycopg",
    "raw_unnest": "raw psycopg (unnest INSERT)",
    "raw_copy": "raw psycopg (COPY)",
    "projectionist": "projectionist",
    "projectionist_exact": "projectionist (exact version)",
    "projectionist_notify": "projectionist (notify=True)",
    "eventsourcing": "eventsourcing",
    "messagedb": "Message DB",
}
#: Raw's ways of sending workload 1's batches; the batched append is judged against the fastest.
RAW_METHODS = {"raw": "executemany", "raw_unnest": "unnest INSERT", "raw_copy": "COPY"}
#: The raw methods that have a column of their own only in their own table.
_RAW_ONLY_IN_WORKLOAD_1 = ("raw_unnest", "raw_copy")

THROUGHPUT_WORKLOADS = {
    "batched_append": "1. Batched append (100 events/txn, 10 aggregates/txn)",
    "concurrent_append": "2. Concurrent single-event appends (8 threads)",
    "catch_up_noop": "3a. Catch-up, no-op projection, 1 worker",
    "catch_up_read_model": "3b. Catch-up, read-model projection (upsert per aggregate), 1 worker",
}


@dataclass
class Cell:
    """One contestant's result on one throughput workload: events/s per repetition, or why not."""

    samples: list[float] = field(default_factory=list)
    reason: str | None = None
    events: int = 0

    @property
    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None


@dataclass
class PartitionedRun:
    wall_seconds: float
    events: int
    rows_fetched: int | None
    reads: int | None
    server_rows_read: int | None
    cpu_seconds: float | None = None
    """CPU the workers and their server backends used while timed (None: the server is not local)."""
    steady: tuple[int, float] | None = None
    """(events, CPU seconds) between 10% and 90% of the events applied: the steady state."""

    @property
    def events_per_cpu_second(self) -> float | None:
        """In the steady state, without each worker's start and the tail (None: not measured)."""
        if self.steady is None or self.steady[1] <= 0:
            return None
        return self.steady[0] / self.steady[1]


@dataclass
class PartitionedCell:
    runs: list[PartitionedRun] = field(default_factory=list)
    reason: str | None = None

    @property
    def median_wall(self) -> float | None:
        return statistics.median(r.wall_seconds for r in self.runs) if self.runs else None

    @property
    def median_cores_busy(self) -> float | None:
        busy = [r.cpu_seconds / r.wall_seconds for r in self.runs if r.cpu_seconds is not None]
        return statistics.median(busy) if busy else None

    @property
    def median_events_per_cpu_second(self) -> float | None:
        rates = [r.events_per_cpu_second for r in self.runs if r.events_per_cpu_second is not None]
        return statistics.median(rates) if rates else None

    @property
    def last(self) -> PartitionedRun | None:
        return self.runs[-1] if self.runs else None


@dataclass
class LatencyRun:
    target_rate: float
    achieved_rate: float
    samples: int
    p50: float
    p95: float
    p99: float
    max: float
    notified: int | None = None
    """Append transactions that sent a NOTIFY (each sends at most one), or None if not counted."""
    appends: int = 0
    """Append transactions in the run."""
    workers_cpu: float | None = None
    """CPU seconds of the 4 workers and their server backends over the run, or None if not measured."""
    seconds: float = 0.0


@dataclass
class Results:
    quick: bool
    sizes: dict[str, int]
    reps: int
    header: list[str] = field(default_factory=list)
    throughput: dict[tuple[str, str], Cell] = field(default_factory=dict)
    partitioned: dict[tuple[str, int], PartitionedCell] = field(default_factory=dict)
    latency: dict[float, list[LatencyRun]] = field(default_factory=dict)
    latency_method: str = ""
    latency_reason: str | None = None
    telemetry: dict[str, Cell] = field(default_factory=dict)
    #: Workload 2's statements sent by pgbench (bench.server_only), by statement key.
    server_only: dict[str, Cell] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: The machine's cores, for the scaling bound of workload 4; None when unknown.
    cores: int | None = None

    def cell(self, workload: str, contestant: str) -> Cell:
        return self.throughput.setdefault((workload, contestant), Cell())

    def median(self, workload: str, contestant: str) -> float | None:
        c = self.throughput.get((workload, contestant))
        return c.median if c else None

    def reason(self, workload: str, contestant: str) -> str | None:
        c = self.throughput.get((workload, contestant))
        if c is None:
            return "not run"
        return c.reason

    def fastest_raw(self, workload: str) -> tuple[str, float] | None:
        """The raw method with the highest median on ``workload``, and that median."""
        measured = [(m, key) for key in RAW_METHODS if (m := self.median(workload, key)) is not None]
        if not measured:
            return None
        median, key = max(measured)
        return key, median


# -- targets -------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    name: str
    measured: str
    target: str
    result: str  # "ok", "MISS" or "not measured: <why>"


def _at_least(name: str, ratio: float | None, minimum: float, why: str | None = None) -> Verdict:
    """The verdict on ``ratio >= minimum``, or "not measured" and ``why`` when there is no ratio.

    The ratio is shown with two decimals, or as many more as it takes for the
    shown value to agree with the verdict: 0.6997 must not read "0.70x ...
    MISS" against 0.7.
    """
    line = f"≥ {minimum:g}\N{MULTIPLICATION SIGN}"
    if ratio is None:
        return Verdict(name, "—", line, f"not measured: {why or 'no samples'}")
    ok = ratio >= minimum
    digits = 2
    while digits < 6 and (round(ratio, digits) >= minimum) != ok:
        digits += 1
    return Verdict(name, f"{ratio:.{digits}f}\N{MULTIPLICATION SIGN}", line, "ok" if ok else "MISS")


def _ratio_target(results: Results, name: str, workload: str, num: str, den: str, minimum: float) -> Verdict:
    a, b = results.median(workload, num), results.median(workload, den)
    if a is None or b is None:
        why = results.reason(workload, num) if a is None else results.reason(workload, den)
        return _at_least(name, None, minimum, why)
    return _at_least(name, a / b, minimum)


def _scaling_efficiency(results: Results, n: int) -> tuple[float | None, str | None]:
    """(events per CPU-second at N) / (the same at N=1), or None and why."""
    one, cell = results.partitioned.get(("projectionist", 1)), results.partitioned.get(("projectionist", n))
    base = one.median_events_per_cpu_second if one else None
    at_n = cell.median_events_per_cpu_second if cell else None
    if base is None or at_n is None:
        why = (one.reason if one else None) or (cell.reason if cell else None)
        return None, why or "CPU time not measured (a server that is not local)"
    return at_n / base, None


def verdicts(results: Results) -> list[Verdict]:
    fastest = results.fastest_raw("batched_append")
    ours = results.median("batched_append", "projectionist")
    if fastest is None or ours is None:
        why = results.reason("batched_append", "raw" if fastest is None else "projectionist")
        batched = _at_least("Batched append vs the fastest raw method", None, 0.8, why)
    else:
        batched = _at_least("Batched append vs the fastest raw method", ours / fastest[1], 0.8)
    out = [
        batched,
        _ratio_target(
            results,
            "Concurrent single-event appends vs raw (the default append)",
            "concurrent_append",
            "projectionist",
            "raw",
            0.85,
        ),
        _ratio_target(
            results,
            "Concurrent single-event appends vs raw (stretch goal)",
            "concurrent_append",
            "projectionist",
            "raw",
            0.9,
        ),
        _ratio_target(
            results, "1-worker catch-up (no-op) vs raw scan", "catch_up_noop", "projectionist", "raw", 0.7
        ),
    ]
    for n in (1, 2, 4):
        cell = results.partitioned.get(("projectionist", n))
        run = cell.last if cell else None
        name = f"Rows fetched by {n} worker{'s' if n > 1 else ''} together vs events"
        # One marker row per read (the newest visible row); 1% covers it.
        target = "1.0\N{MULTIPLICATION SIGN} (≤ 1.01\N{MULTIPLICATION SIGN} with marker rows)"
        if run is None or run.rows_fetched is None:
            why = (cell.reason if cell else None) or "pg_stat_statements unavailable"
            out.append(Verdict(name, "—", target, f"not measured: {why}"))
        else:
            ratio = run.rows_fetched / max(run.events, 1)
            out.append(
                Verdict(
                    name, f"{ratio:.3f}\N{MULTIPLICATION SIGN}", target, "ok" if ratio <= 1.01 else "MISS"
                )
            )
    # Events per CPU-second of the workers and their server backends: the
    # cost of an event must not grow with N. Unlike the wall-clock speed-up,
    # it does not depend on how many cores the machine has to spare.
    for n in (2, 4):
        efficiency, why = _scaling_efficiency(results, n)
        out.append(
            _at_least(f"Scaling efficiency, {n} workers vs 1 (events per CPU-second)", efficiency, 0.9, why)
        )
    runs = results.latency.get(500.0)
    if runs:
        p99 = statistics.median(r.p99 for r in runs) * 1000
        out.append(
            Verdict(
                "Append-to-applied p99 at 500 events/s",
                f"{p99:.1f} ms",
                "< 50 ms",
                "ok" if p99 < 50 else "MISS",
            )
        )
    else:
        out.append(
            Verdict(
                "Append-to-applied p99 at 500 events/s",
                "—",
                "< 50 ms",
                f"not measured: {results.latency_reason or 'not run'}",
            )
        )
    for workload, label in [
        ("batched_append", "Batched append vs eventsourcing"),
        ("concurrent_append", "Concurrent appends vs eventsourcing"),
        ("catch_up_noop", "Catch-up vs eventsourcing"),
    ]:
        out.append(_ratio_target(results, label, workload, "projectionist", "eventsourcing", 2.0))
    with_t, without = results.telemetry.get("with"), results.telemetry.get("without")
    name = "Catch-up with telemetry vs without"
    if with_t and without and with_t.median and without.median:
        out.append(_at_least(name, with_t.median / without.median, 0.9))
    else:
        why = (with_t.reason if with_t else None) or (without.reason if without else None) or "not run"
        out.append(_at_least(name, None, 0.9, why))
    return out


# -- rendering -----------------------------------------------------------------


def _rate(v: float | None) -> str:
    return "—" if v is None else f"{v:,.0f}"


def _spread(samples: list[float]) -> str:
    """Half the min-max range as a percentage of the median: how noisy the repetitions were."""
    if len(samples) < 2:
        return ""
    median = statistics.median(samples)
    return f" ±{(max(samples) - min(samples)) / 2 / median * 100:.0f}%" if median else ""


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A Markdown table's lines (the reports' and ``bench.spread``'s)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _ratio(a: float | None, b: float | None) -> str:
    return "—" if a is None or b is None or b == 0 else f"{a / b:.2f}\N{MULTIPLICATION SIGN}"


def _raw_methods_section(results: Results) -> list[str]:
    """Workload 1's raw methods side by side, and projectionist against each."""
    cells = {key: results.throughput.get(("batched_append", key)) for key in RAW_METHODS}
    if not any(c is not None for key, c in cells.items() if key != "raw"):
        return []
    ours = results.median("batched_append", "projectionist")
    rows = []
    for key, method in RAW_METHODS.items():
        cell = cells[key]
        if cell is None:
            continue
        if cell.reason:
            rows.append([method, f"not measured: {cell.reason}", "—"])
            continue
        rows.append([method, _rate(cell.median) + _spread(cell.samples), _ratio(ours, cell.median)])
    lines = [
        "### 1. Raw's ways of sending the same batches",
        "",
        "The batched append is judged against the fastest. Each sends 100 events per transaction, "
        "with versions from a client-side counter: no read, no lock, no check.",
        "",
    ]
    lines += markdown_table(["Raw psycopg method", "events/s", "projectionist ÷ this"], rows)
    lines.append("")
    return lines


def _server_only_section(results: Results) -> list[str]:
    if not results.server_only:
        return []

    clients = results.sizes.get("threads", "?")
    lines = [
        f"## 2s. Workload 2 on the server alone (pgbench: the same SQL from {clients} C clients)",
        "",
        "No target: this splits workload 2's ratio into the server's part and the Python client's. "
        f"Each client appends single events to {SERVER_ONLY_AGGREGATES_PER_CLIENT} aggregates of its own, "
        "one per transaction; pgbench's clients use next to no CPU.",
        "",
    ]
    raw_cell = results.server_only.get("raw")
    raw = raw_cell.median if raw_cell else None
    rows = []
    for key, label in SERVER_ONLY_STATEMENTS.items():
        cell = results.server_only.get(key)
        if cell is None:
            continue
        if cell.reason:
            rows.append([label, f"not measured: {cell.reason}", "—"])
            continue
        rows.append([label, _rate(cell.median) + _spread(cell.samples), _ratio(cell.median, raw)])
    lines += markdown_table(["Statement", "events/s", "÷ raw"], rows)
    lines.append("")
    return lines


def render(results: Results) -> str:
    lines: list[str] = []
    mode = "quick smoke run (no thresholds apply)" if results.quick else "full run"
    lines.append(f"# projectionist benchmark: {mode}")
    lines.append("")
    lines += [f"- {h}" for h in results.header]
    sizes = ", ".join(f"{k}={v:,}" for k, v in results.sizes.items())
    lines.append(f"- Sizes: {sizes}; median of {results.reps} repetition(s) after a warm-up run")
    lines.append("")

    lines.append("## Targets")
    lines.append("")
    v = verdicts(results)
    lines += markdown_table(
        ["Target", "Measured", "Target", "Result"], [[x.name, x.measured, x.target, x.result] for x in v]
    )
    misses = [x.name for x in v if x.result == "MISS"]
    lines.append("")
    lines.append(f"**{len(misses)} miss(es)**: {'; '.join(misses)}" if misses else "**No misses.**")
    lines.append("")

    lines.append("## Throughput (events/s: median ± half the min-max spread of the repetitions)")
    lines.append("")
    present = [
        c
        for c in CONTESTANTS
        if c not in _RAW_ONLY_IN_WORKLOAD_1 and any(k[1] == c for k in results.throughput)
    ]
    headers = [
        "Workload",
        *[LABELS[c] for c in present],
        "projectionist ÷ raw",
        "÷ eventsourcing",
        "÷ Message DB",
    ]
    rows = []
    for workload, label in THROUGHPUT_WORKLOADS.items():
        row = [label]
        # Workload 1's raw is the fastest of raw's methods (see the table below).
        fastest = results.fastest_raw(workload) if workload == "batched_append" else None
        for c in present:
            key = fastest[0] if c == "raw" and fastest else c
            cell = results.throughput.get((workload, key))
            if cell is None:
                row.append("—")
            elif cell.reason:
                row.append(f"not measured: {cell.reason}")
            else:
                method = f" ({RAW_METHODS[key]})" if fastest and c == "raw" else ""
                row.append(_rate(cell.median) + _spread(cell.samples) + method)
        ours = results.median(workload, "projectionist")
        raw = fastest[1] if fastest else results.median(workload, "raw")
        row += [
            _ratio(ours, raw),
            *(_ratio(ours, results.median(workload, d)) for d in ("eventsourcing", "messagedb")),
        ]
        rows.append(row)
    lines += markdown_table(headers, rows)
    lines.append("")
    lines += _raw_methods_section(results)
    notify = results.median("concurrent_append", "projectionist_notify")
    if notify is not None:
        lines.append(
            "Workload 2 with `notify=True` (a NOTIFY in every append transaction, the opt-in): "
            f"{_ratio(notify, results.median('concurrent_append', 'raw'))} of raw; "
            f"the default sends a NOTIFY only while a worker sleeps, and none sleeps here."
        )
        lines.append("")

    lines += _server_only_section(results)

    lines.append("## 4. Partitioned catch-up (N worker processes)")
    lines.append("")
    prow: list[list[str]] = []
    base: dict[str, float] = {}
    for contestant in ("projectionist", "messagedb"):
        for n in (1, 2, 4):
            pcell = results.partitioned.get((contestant, n))
            label = f"{LABELS[contestant]}, N={n}"
            if pcell is None:
                continue
            if pcell.reason or not pcell.runs:
                prow.append([label, f"not measured: {pcell.reason}", "", "", "", "", "", "", "", ""])
                continue
            wall = pcell.median_wall
            assert wall is not None
            run = pcell.last
            assert run is not None
            if n == 1:
                base[contestant] = wall
            speed = f"{base[contestant] / wall:.2f}\N{MULTIPLICATION SIGN}" if contestant in base else "—"
            fetched = "—" if run.rows_fetched is None else f"{run.rows_fetched:,}"
            ratio = (
                "—"
                if run.rows_fetched is None
                else f"{run.rows_fetched / max(run.events, 1):.3f}\N{MULTIPLICATION SIGN}"
            )
            scanned = (
                "—"
                if run.server_rows_read is None
                else f"{run.server_rows_read / max(run.events, 1):.2f}\N{MULTIPLICATION SIGN}"
            )
            busy = pcell.median_cores_busy
            cores = "—" if busy is None else f"{busy:.2f}"
            per_cpu = pcell.median_events_per_cpu_second
            efficiency = None
            if contestant == "projectionist" and per_cpu is not None:
                efficiency, _ = _scaling_efficiency(results, n) if n > 1 else (1.0, None)
            prow.append(
                [
                    label,
                    f"{wall:.2f}" + _spread([r.wall_seconds for r in pcell.runs]),
                    _rate(run.events / wall),
                    speed,
                    cores,
                    "—" if per_cpu is None else _rate(per_cpu),
                    "—" if efficiency is None else f"{efficiency:.2f}\N{MULTIPLICATION SIGN}",
                    fetched,
                    ratio,
                    scanned,
                ]
            )
    lines += markdown_table(
        [
            "Contestant",
            "Wall time (s)",
            "events/s",
            "Speed-up vs N=1",
            "Cores busy",
            "Events per CPU-second",
            "Scaling efficiency vs N=1",
            "Rows sent to workers",
            "Rows sent ÷ events",
            "Rows the server read ÷ events",
        ],
        prow,
    )
    lines.append("")
    lines.append(
        "Cores busy: CPU time of the worker processes and their server backends while timed, "
        "divided by the wall time (projectionist only, and only with a local server). Events per "
        "CPU-second: the events applied between 10% and 90% of the run, divided by the CPU time "
        "the same processes used meanwhile (the steady state, without each worker's start, when a "
        "fresh backend fills its caches and plans the read, and without the tail where the last "
        "worker finishes alone). Scaling efficiency compares it with N=1, so it says whether an "
        "event costs more with more workers, whatever the cores the machine has to spare. The "
        "wall-clock speed-up is information: at the same CPU cost per event, N workers can go at "
        "most the machine's cores divided by one worker's cores busy times as fast as one."
    )
    one = results.partitioned.get(("projectionist", 1))
    one_busy = None if one is None else one.median_cores_busy
    if results.cores and one_busy:
        lines.append("")
        lines.append(
            f"On this run: {results.cores} cores \N{DIVISION SIGN} {one_busy:.2f} cores busy for one worker "
            f"= at most {results.cores / one_busy:.2f}\N{MULTIPLICATION SIGN} for any N."
        )
    lines.append("")

    lines.append("## 5. Append-to-applied latency, 4 workers live (projectionist)")
    lines.append("")
    if results.latency:
        lrows = []
        for rate, runs in sorted(results.latency.items()):
            med = statistics.median
            appends = sum(r.appends for r in runs)
            notified = [r.notified for r in runs if r.notified is not None]
            workers_busy = [
                r.workers_cpu / r.seconds for r in runs if r.workers_cpu is not None and r.seconds
            ]
            lrows.append(
                [
                    f"{rate:,.0f}",
                    f"{med(r.achieved_rate for r in runs):,.0f}",
                    f"{sum(r.samples for r in runs):,}",
                    f"{med(r.p50 for r in runs) * 1000:.1f}",
                    f"{med(r.p95 for r in runs) * 1000:.1f}",
                    f"{med(r.p99 for r in runs) * 1000:.1f}",
                    f"{max(r.max for r in runs) * 1000:.1f}",
                    f"{sum(notified):,} of {appends:,}" if notified and appends else "—",
                    f"{med(workers_busy):.2f}" if workers_busy else "—",
                ]
            )
        lines += markdown_table(
            [
                "Target events/s",
                "Achieved",
                "Samples",
                "p50 (ms)",
                "p95 (ms)",
                "p99 (ms)",
                "max (ms)",
                "Appends that sent a NOTIFY",
                "Workers' cores busy",
            ],
            lrows,
        )
        lines.append("")
        lines.append(f"Measured as: {results.latency_method}")
        lines.append("")
        lines.append(
            "Appends use the default: a NOTIFY only while a worker sleeps behind the doorbell. "
            "Workers' cores busy: CPU time of the 4 worker processes and their server backends "
            "over the run, divided by its wall time."
        )
    else:
        lines.append(f"not measured: {results.latency_reason or 'not run'}")
    lines.append("")

    lines.append("## Telemetry cost: 1-worker no-op catch-up, projectionist")
    lines.append("")
    pairs = max((len(c.samples) for c in results.telemetry.values()), default=0)
    if pairs:
        lines.append(f"Median of {pairs} runs each, with and without taking turns, each in a fresh process.")
        lines.append("")
    trows = []
    for key, label in (("without", "hooks=WorkerHooks() (none)"), ("with", "telemetry HookChain")):
        cell = results.telemetry.get(key)
        if cell is None:
            trows.append([label, "not run"])
        elif cell.reason:
            trows.append([label, f"not measured: {cell.reason}"])
        else:
            trows.append([label, _rate(cell.median) + _spread(cell.samples)])
    lines += markdown_table(["Hooks", "events/s"], trows)
    lines.append("")

    if results.notes:
        lines.append("## Notes")
        lines.append("")
        lines += [f"- {n}" for n in results.notes]
        lines.append("")
    return "\n".join(lines)
