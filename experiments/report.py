"""The scaling experiment's results: per-phase summary, CSV files, a PNG chart, a Markdown table.

Pure functions of the samples, so they are tested on made-up samples and
re-run on a finished experiment's data.
"""

from __future__ import annotations

import csv
import itertools
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from experiments.sampling import StoreSample

#: Our processes by role; "sampler" is the experiment's own process.
ROLES = ("api", "locust", "workers", "postgres", "sampler")
#: CPU columns: our roles, then everything else the machine ran meanwhile.
CPU_COLUMNS = (*ROLES, "other")


@dataclass(frozen=True, slots=True)
class Phase:
    """A stretch of the run with a fixed set of running workers and a fixed partition count."""

    name: str
    workers: tuple[int, ...]
    load: bool = True
    added: int | None = None
    removed: int | None = None
    total: int = 4
    #: The phase starts by changing the partition count to ``total`` (``projectionist rescale``).
    rescale: bool = False

    @property
    def label(self) -> str:
        """A short name for the chart's phase markers."""
        if self.rescale:
            return f"rescale to {self.total}"
        if not self.load:
            return "drain"
        if self.added is not None:
            return f"+w{self.added}"
        if self.removed is not None:
            return f"-w{self.removed}"
        return self.name


@dataclass(frozen=True, slots=True)
class Sample:
    """One observation: seconds since the start, the phase, the store, and cumulative CPU seconds.

    ``cpu_busy`` and ``cpu_total`` are the whole machine's busy and total CPU
    seconds (all cores); ``cpu_roles`` our processes' CPU seconds by role.
    """

    t: float
    phase: int
    running: tuple[int, ...]
    store: StoreSample
    cpu_busy: float
    cpu_total: float
    cpu_roles: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PhaseSummary:
    phase: Phase
    start: float
    end: float
    append_rate: float
    worker_rates: tuple[float, ...]
    shares: tuple[float, ...]
    lag_events_p50: float
    lag_events_max: int
    lag_seconds_p50: float
    lag_seconds_max: float
    #: Seconds from the phase start until the added worker's partition (after a rescale:
    #: every partition) lagged by at most the threshold.
    catch_up: float | None
    #: Share of all CPU cores busy (1.0 = every core), and cores used per role (and "other").
    cpu_busy: float
    cpu_cores: dict[str, float]

    @property
    def seconds(self) -> float:
        return self.end - self.start


def rate(first: float, last: float, seconds: float) -> float:
    return (last - first) / seconds if seconds > 0 else 0.0


def catch_up_time(
    samples: Sequence[Sample], worker_id: int | None, since: float, max_lag_seconds: float
) -> float | None:
    """Seconds after ``since`` until ``worker_id``'s partition (``None``: every partition)
    first lags by at most ``max_lag_seconds`` after its worker applied an event.

    Not merely the first sample within the threshold: the one taken as the
    worker is started finds a backlog younger than a second when the load has
    just begun, and read "caught up in 0.0 s" while the process was still
    importing, its lag about to grow.
    """
    baseline: int | None = None
    for s in samples:
        if s.t < since:
            continue
        if worker_id is None:
            lag, processed = s.store.lag_seconds, sum(p.processed for p in s.store.partitions)
        elif worker_id in s.running and worker_id < len(s.store.partitions):
            own = s.store.partitions[worker_id]
            lag, processed = own.lag_seconds, own.processed
        else:
            continue
        if baseline is None:
            baseline = processed
        elif processed > baseline and lag <= max_lag_seconds:
            return s.t - since
    return None


def _processed_rates(a: Sample, b: Sample) -> list[float | None]:
    """Events/s per partition between two samples; ``None`` across a change of partition count."""
    if len(a.store.partitions) != len(b.store.partitions):
        return [None] * len(b.store.partitions)
    dt = b.t - a.t
    return [
        rate(p.processed, q.processed, dt)
        for p, q in zip(a.store.partitions, b.store.partitions, strict=True)
    ]


def _rate_or(rates: Sequence[float | None], k: int, default: float) -> float:
    value = rates[k] if k < len(rates) else None
    return default if value is None else value


def max_partitions(samples: Sequence[Sample]) -> int:
    return max((len(s.store.partitions) for s in samples), default=0)


def summarize(
    samples: Sequence[Sample],
    phases: Sequence[Phase],
    starts: Sequence[float],
    end: float,
    *,
    max_lag_seconds: float = 1.0,
) -> list[PhaseSummary]:
    """One summary per phase; ``starts[i]`` is when phase i began, ``end`` when the last one ended."""
    summaries = []
    bounds = [*starts, end]
    for i, phase in enumerate(phases):
        start, stop = bounds[i], bounds[i + 1]
        inside = [s for s in samples if start <= s.t <= stop]
        if len(inside) < 2:
            continue
        # The partition count changes only at a phase start, before its first sample.
        inside = [s for s in inside if len(s.store.partitions) == phase.total] or inside
        first, last = inside[0], inside[-1]
        seconds = last.t - first.t
        processed = [
            q.processed - p.processed
            for p, q in zip(first.store.partitions, last.store.partitions, strict=False)
        ]
        all_processed = sum(processed)
        lag_events = [s.store.lag_events for s in inside]
        lag_seconds = [s.store.lag_seconds for s in inside]
        cpu_all = last.cpu_total - first.cpu_total
        summaries.append(
            PhaseSummary(
                phase=phase,
                start=start,
                end=stop,
                append_rate=rate(first.store.head, last.store.head, seconds),
                worker_rates=tuple(n / seconds if seconds > 0 else 0.0 for n in processed),
                shares=tuple(n / all_processed if all_processed else 0.0 for n in processed),
                lag_events_p50=statistics.median(lag_events),
                lag_events_max=max(lag_events),
                lag_seconds_p50=statistics.median(lag_seconds),
                lag_seconds_max=max(lag_seconds),
                catch_up=(
                    catch_up_time(samples, phase.added, start, max_lag_seconds)
                    if phase.added is not None or phase.rescale
                    else None
                ),
                cpu_busy=(last.cpu_busy - first.cpu_busy) / cpu_all if cpu_all > 0 else 0.0,
                cpu_cores=_cores(first, last),
            )
        )
    return summaries


def _cores(first: Sample, last: Sample) -> dict[str, float]:
    seconds = last.t - first.t
    cores = {
        role: rate(first.cpu_roles.get(role, 0.0), last.cpu_roles.get(role, 0.0), seconds) for role in ROLES
    }
    busy = rate(first.cpu_busy, last.cpu_busy, seconds)
    cores["other"] = max(0.0, busy - sum(cores.values()))
    return cores


def write_samples_csv(samples: Sequence[Sample], phases: Sequence[Phase], path: Path) -> None:
    """One row per sample, rates computed between consecutive samples."""
    if not samples:
        return
    totals = max_partitions(samples)
    header = [
        "t_seconds",
        "phase",
        "partitions",
        "workers_running",
        "head_position",
        "append_rate",
        "lag_events",
        "lag_seconds",
    ]
    for k in range(totals):
        header += [f"w{k}_events_per_s", f"w{k}_processed", f"w{k}_lag_events", f"w{k}_lag_seconds"]
    header += ["cpu_busy", *(f"cpu_{role}_cores" for role in CPU_COLUMNS)]
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(header)
        previous = samples[0]
        for s in samples:
            dt = s.t - previous.t
            row: list[object] = [
                f"{s.t:.2f}",
                phases[s.phase].name,
                len(s.store.partitions),
                " ".join(str(w) for w in s.running),
                s.store.head,
                f"{rate(previous.store.head, s.store.head, dt):.1f}",
                s.store.lag_events,
                f"{s.store.lag_seconds:.3f}",
            ]
            rates = _processed_rates(previous, s) if dt > 0 else [0.0] * len(s.store.partitions)
            for k in range(totals):
                if k >= len(s.store.partitions):
                    row += ["", "", "", ""]
                    continue
                p, r = s.store.partitions[k], rates[k]
                row += ["" if r is None else f"{r:.1f}", p.processed, p.lag_events, f"{p.lag_seconds:.3f}"]
            cpu_all = s.cpu_total - previous.cpu_total
            row.append(f"{(s.cpu_busy - previous.cpu_busy) / cpu_all:.3f}" if cpu_all > 0 else "")
            cores = _cores(previous, s) if dt > 0 else {}
            row += [f"{cores.get(r, 0.0):.2f}" for r in CPU_COLUMNS]
            out.writerow(row)
            previous = s


def _catch_up_text(summary: PhaseSummary) -> str:
    if summary.phase.added is None and not summary.phase.rescale:
        return ""
    who = "all" if summary.phase.added is None else f"w{summary.phase.added}"
    if summary.catch_up is None:
        return f"{who}: not within the run"
    return f"{who}: {summary.catch_up:.1f} s"


def _columns(summaries: Sequence[PhaseSummary]) -> int:
    return max((len(s.worker_rates) for s in summaries), default=0)


def _at(values: Sequence[float], k: int) -> float:
    return values[k] if k < len(values) else 0.0


def write_phases_csv(summaries: Sequence[PhaseSummary], path: Path) -> None:
    totals = _columns(summaries)
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(
            [
                "phase",
                "partitions",
                "workers",
                "seconds",
                "append_events_per_s",
                *(f"w{k}_events_per_s" for k in range(totals)),
                *(f"w{k}_share" for k in range(totals)),
                "lag_events_p50",
                "lag_events_max",
                "lag_seconds_p50",
                "lag_seconds_max",
                "added_worker",
                "catch_up_seconds",
                "cpu_busy",
                *(f"cpu_{r}_cores" for r in CPU_COLUMNS),
            ]
        )
        for s in summaries:
            out.writerow(
                [
                    s.phase.name,
                    s.phase.total,
                    " ".join(str(w) for w in s.phase.workers),
                    f"{s.seconds:.1f}",
                    f"{s.append_rate:.0f}",
                    *(f"{_at(s.worker_rates, k):.0f}" for k in range(totals)),
                    *(f"{_at(s.shares, k):.3f}" for k in range(totals)),
                    f"{s.lag_events_p50:.0f}",
                    s.lag_events_max,
                    f"{s.lag_seconds_p50:.2f}",
                    f"{s.lag_seconds_max:.2f}",
                    "" if s.phase.added is None else s.phase.added,
                    "" if s.catch_up is None else f"{s.catch_up:.1f}",
                    f"{s.cpu_busy:.2f}",
                    *(f"{s.cpu_cores.get(r, 0.0):.2f}" for r in CPU_COLUMNS),
                ]
            )


def markdown_table(summaries: Sequence[PhaseSummary]) -> str:
    """The per-phase table for the README."""
    totals = _columns(summaries)
    head = [
        "phase",
        "append ev/s",
        *(f"w{k} ev/s (share)" for k in range(totals)),
        "lag events p50 / max",
        "lag s p50 / max",
        "catch-up",
        "CPU busy",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for s in summaries:
        cells = [s.phase.name, f"{s.append_rate:,.0f}"]
        for k in range(totals):
            active = k in s.phase.workers or _at(s.worker_rates, k) > 0
            cells.append(f"{_at(s.worker_rates, k):,.0f} ({_at(s.shares, k):.0%})" if active else "-")
        cells += [
            f"{s.lag_events_p50:,.0f} / {s.lag_events_max:,}",
            f"{s.lag_seconds_p50:.1f} / {s.lag_seconds_max:.1f}",
            _catch_up_text(s),
            f"{s.cpu_busy:.0%}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cpu_table(summaries: Sequence[PhaseSummary]) -> str:
    """CPU cores used per role and phase: where a small machine's cores go."""
    lines = [
        "| phase | CPU busy | " + " | ".join(f"{r} (cores)" for r in CPU_COLUMNS) + " |",
        "|---|---:|" + "---:|" * len(CPU_COLUMNS),
    ]
    for s in summaries:
        cells = [s.phase.name, f"{s.cpu_busy:.0%}", *(f"{s.cpu_cores.get(r, 0.0):.2f}" for r in CPU_COLUMNS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(
    samples: Sequence[Sample],
    phases: Sequence[Phase],
    starts: Sequence[float],
    path: Path,
    *,
    title: str,
    target_rate: float | None = None,
) -> None:
    """Lag (events and seconds) and per-worker rate over time, with a marker at each phase change."""
    import matplotlib

    matplotlib.use("Agg")  # no display here, and none needed
    import matplotlib.pyplot as plt

    if not samples:
        return
    totals = max_partitions(samples)
    t = [s.t for s in samples]
    fig, axes = plt.subplots(3, 1, figsize=(11, 9), sharex=True, constrained_layout=True)
    lag_ax, lag_s_ax, rate_ax = axes
    colors = plt.get_cmap("tab10")
    nan = float("nan")  # a gap in the line: partition k does not exist at that time
    first_rates: list[float | None] = [0.0] * len(samples[0].store.partitions)
    pair_rates = [first_rates, *(_processed_rates(a, b) for a, b in itertools.pairwise(samples))]
    for k in range(totals):
        parts = [s.store.partitions[k] if k < len(s.store.partitions) else None for s in samples]
        lag_ax.plot(t, [p.lag_events if p else nan for p in parts], color=colors(k), label=f"partition {k}")
        lag_s_ax.plot(t, [p.lag_seconds if p else nan for p in parts], color=colors(k))
        raw = [_rate_or(r, k, nan) for r in pair_rates]
        # A 3-sample moving average: per-second deltas of a batching worker are jumpy.
        smooth = [statistics.fmean(raw[max(0, i - 2) : i + 1]) for i in range(len(raw))]
        rate_ax.plot(t, smooth, color=colors(k), label=f"worker {k}")
    appended = [0.0] + [rate(a.store.head, b.store.head, b.t - a.t) for a, b in itertools.pairwise(samples)]
    appended = [statistics.fmean(appended[max(0, i - 2) : i + 1]) for i in range(len(appended))]
    rate_ax.plot(t, appended, color="black", linestyle="--", label="appended")
    if target_rate:
        rate_ax.axhline(target_rate, color="grey", linestyle=":", label="offered")
    lag_ax.set_ylabel("lag (events)")
    lag_s_ax.set_ylabel("lag (s, oldest unapplied)")
    rate_ax.set_ylabel("events/s")
    rate_ax.set_xlabel("seconds since the first worker started")
    lag_ax.legend(loc="upper right", fontsize="small")
    rate_ax.legend(loc="upper right", fontsize="small", ncol=3)
    for ax in axes:
        ax.grid(alpha=0.3)
        for start in starts:
            ax.axvline(start, color="grey", linewidth=0.8)
    top = lag_ax.get_ylim()[1]
    for phase, start in zip(phases, starts, strict=False):
        lag_ax.text(start, top, f" {phase.label}", va="top", ha="left", fontsize="small")
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
