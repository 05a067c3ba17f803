"""The autoscaling experiment's results: the targets, a CSV, a PNG chart and a Markdown report.

Pure functions of the ticks the experiment recorded at each polling interval,
so they are tested on made-up ticks.
"""

from __future__ import annotations

import csv
import datetime as dt
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from experiments.autoscale_options import Options
from experiments.hpa import ScaledObjectModel, direction_changes
from projectionist.demo.verify import Verification, format_verification


@dataclass(frozen=True, slots=True)
class Tick:
    """What one polling interval saw and did."""

    #: Real seconds since the start.
    t: float
    phase: str  # "base", "step" or "after"
    #: The rate the appender was asked for, and the rate it appended at since the last tick.
    offered: float
    appended_rate: float
    #: The replica count after this interval's decision.
    replicas: int
    #: Each trigger's value (by trigger name: "lag", "busy").
    values: dict[str, float]
    #: Partitions owned by each member.
    owned: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Outcome:
    name: str
    target: str
    measured: str
    ok: bool


def _scaled_minutes(seconds: float, scale: float) -> float:
    return seconds * scale / 60.0


def targets(ticks: Sequence[Tick], o: Options, model: ScaledObjectModel) -> list[Outcome]:
    """The four targets of the experiment, measured on its ticks."""
    lag_target = next(m.target for m in model.autoscaler.metrics if m.name == "lag")
    poll, up_window = model.polling_interval, model.autoscaler.up.window
    step = [t for t in ticks if t.phase == "step"]
    out: list[Outcome] = []
    step_at = step[0].t if step else 0.0
    before = ticks[ticks.index(step[0]) - 1].replicas if step and ticks.index(step[0]) > 0 else 0
    first_up = next((t for t in step if t.replicas > before), None)
    crossed = next((t for t in step if t.values["lag"] >= lag_target), None)
    limit = poll + up_window
    if first_up is None:
        out.append(
            Outcome("scale-up starts", f"within {limit:.1f} s of the lag crossing", "no scale-up", False)
        )
    elif crossed is None or first_up.t < crossed.t:
        when = f"{first_up.t - step_at:.1f} s after the step"
        note = (
            "before the lag crossed its target (busy members)"
            if crossed
            else "the lag never crossed its target"
        )
        out.append(
            Outcome(
                "scale-up starts within one polling interval plus the scale-up window after the lag crosses "
                f"its target ({lag_target:g} s)",
                f"≤ {limit:.1f} s ({poll:.1f} + {up_window:.1f})",
                f"{when}, {note}",
                True,
            )
        )
    else:
        delay = first_up.t - crossed.t
        out.append(
            Outcome(
                "scale-up starts within one polling interval plus the scale-up window after the lag crosses "
                f"its target ({lag_target:g} s)",
                f"≤ {limit:.1f} s ({poll:.1f} + {up_window:.1f})",
                f"{delay:.1f} s after the crossing",
                delay <= limit + poll / 2,
            )
        )
    high = [t for t in step if t.values["lag"] >= lag_target]
    recovered = (high[-1].t + poll - step_at) if high else 0.0
    budget = o.seconds(3.0)
    out.append(
        Outcome(
            f"lag below {lag_target:g} s within 3 scaled minutes of the step",
            f"≤ {budget:.0f} s (3 scaled minutes)",
            f"{recovered:.1f} s ({_scaled_minutes(recovered, o.scale):.1f} scaled minutes); peak "
            f"{max((t.values['lag'] for t in step), default=0):.1f} s",
            recovered <= budget,
        )
    )
    after = [t for t in ticks if t.phase == "after"]
    minimum = model.autoscaler.minimum
    back = next(
        (
            t
            for t in after
            if t.replicas <= minimum and all(x.replicas <= minimum for x in after if x.t >= t.t)
        ),
        None,
    )
    stop_at = after[0].t if after else 0.0
    out.append(
        Outcome(
            "the fleet returns to its minimum after the load stops",
            f"{minimum} replica(s) by the end",
            f"{minimum} after {back.t - stop_at:.0f} s "
            f"({_scaled_minutes(back.t - stop_at, o.scale):.1f} scaled minutes)"
            if back
            else f"still {after[-1].replicas if after else '?'} at the end",
            back is not None,
        )
    )
    turns = direction_changes([(t.t, t.replicas) for t in ticks])
    window = o.seconds(10.0)
    most = max((sum(1 for u in turns if s <= u < s + window) for s in turns), default=0)
    out.append(
        Outcome(
            "no more than one change of direction per scaled 10 minutes",
            f"≤ 1 per {window:.0f} s",
            f"{len(turns)} change(s) in the run, at most {most} in any 10 scaled minutes",
            most <= 1,
        )
    )
    return out


def write_csv(ticks: Sequence[Tick], path: Path) -> None:
    names = sorted({k for t in ticks for k in t.values})
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["t_seconds", "phase", "offered_rate", "appended_rate", "replicas", *names, "owned_per_member"]
        )
        for t in ticks:
            writer.writerow(
                [
                    f"{t.t:.2f}",
                    t.phase,
                    f"{t.offered:.0f}",
                    f"{t.appended_rate:.1f}",
                    t.replicas,
                    *(f"{t.values.get(n, 0):.3f}" for n in names),
                    " ".join(map(str, t.owned)),
                ]
            )


def write_png(ticks: Sequence[Tick], o: Options, model: ScaledObjectModel, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [_scaled_minutes(t.t, o.scale) for t in ticks]
    lag_target = next(m.target for m in model.autoscaler.metrics if m.name == "lag")
    fig, axes = plt.subplots(4, 1, figsize=(10, 11), sharex=True)
    ax = axes[0]
    ax.plot(x, [t.appended_rate for t in ticks], label="appended", color="tab:blue")
    ax.plot(x, [t.offered for t in ticks], label="offered", color="tab:gray", linestyle="--", linewidth=1)
    ax.set_ylabel("events/s")
    ax.set_title("Append rate")
    ax.legend(loc="upper right")
    ax = axes[1]
    ax.step(x, [t.replicas for t in ticks], where="post", color="tab:green", label="replicas")
    ax.plot(
        x, [t.values.get("busy", 0) for t in ticks], color="tab:orange", linewidth=1, label="busy members"
    )
    ax.set_ylabel("workers")
    ax.set_title("Replicas (elastic workers)")
    ax.legend(loc="upper right")
    ax = axes[2]
    ax.plot(x, [t.values.get("lag", 0) for t in ticks], color="tab:red", label="lag")
    ax.axhline(lag_target, color="tab:red", linestyle=":", linewidth=1, label=f"target {lag_target:g} s")
    ax.set_ylabel("seconds")
    ax.set_title("Lag: age of the oldest unapplied event (projectionist_lag)")
    ax.legend(loc="upper right")
    ax = axes[3]
    ax.plot(
        x, [max(t.owned) if t.owned else 0 for t in ticks], color="tab:purple", label="most owned by a member"
    )
    ax.plot(
        x, [min(t.owned) if t.owned else 0 for t in ticks], color="tab:cyan", label="fewest owned by a member"
    )
    ax.plot(
        x,
        [o.partitions / len(t.owned) if t.owned else 0 for t in ticks],
        color="black",
        linestyle=":",
        linewidth=1,
        label=f"{o.partitions} / members",
    )
    ax.set_ylabel("partitions")
    ax.set_title("Partitions per worker")
    ax.legend(loc="upper right")
    ax.set_xlabel(f"scaled minutes (time scale {o.scale:g}: one minute here is {60 / o.scale:g} s)")
    for a in axes:
        for t in ticks:
            if t.phase == "step":
                a.axvline(_scaled_minutes(t.t, o.scale), color="gray", linewidth=0.5)
                break
        for t in ticks:
            if t.phase == "after":
                a.axvline(_scaled_minutes(t.t, o.scale), color="gray", linewidth=0.5)
                break
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def render_markdown(
    ticks: Sequence[Tick],
    o: Options,
    model: ScaledObjectModel,
    cooldown: float,
    verification: Verification,
    load_average: tuple[float, float, float],
) -> str:
    scaler = model.autoscaler
    lines = [
        "# The autoscaling experiment (`make autoscale-experiment`)",
        "",
        f"- Date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}; machine: {platform.node()}, "
        f"{platform.machine()}, load average at the end {' '.join(f'{x:.2f}' for x in load_average)}",
        f"- Time scale {o.scale:g}: every duration of the ScaledObject "
        "(deploy/kubernetes/elastic/scaledobject.yaml) is divided by it, and the run's minutes are "
        "scaled minutes. Polling every "
        f"{model.polling_interval:g} s, scale-up window {scaler.up.window:g} s, scale-down window "
        f"{scaler.down.window:g} s, cooldown to zero {cooldown:g} s; replicas {scaler.minimum} to "
        f"{scaler.maximum}.",
        "- The autoscaler runs the ScaledObject's own triggers against the database each interval: "
        + "; ".join(
            f"`{q}` ({m.metric_type}, target {m.target:g})"
            for m, q in zip(scaler.metrics, model.queries.values(), strict=True)
        )
        + ", with the HPA's algorithm (desired = ceil(current x value / target) for a Value, "
        "ceil(value / target) for an AverageValue, 10 % tolerance, stabilisation windows, policies).",
        f"- The load: the demo's sample events, {o.base_rate:g} events/s for {o.base_minutes:g} scaled "
        f"minutes, {o.step_rate:g} for {o.step_minutes:g}, then none for {o.after_minutes:g}.",
        f"- The projection waits {o.cost * 1000:g} ms per event, as a call to a slow service would "
        f"(experiments/slow_service.py), in batches of {o.batch_size}: one worker applies about "
        f"{1 / o.cost:.0f} events/s. On this 2-core machine more workers add capacity only because the "
        "work waits rather than computes; a CPU-bound projection would not speed up past the cores.",
        f"- {o.partitions} partitions; every worker is a real `projectionist worker --elastic` process.",
        "",
        "![replicas, lag and partitions over time](autoscale-experiment.png)",
        "",
        "## Targets",
        "",
        "| Target | Goal | Measured | Result |",
        "|---|---|---|---|",
    ]
    for t in targets(ticks, o, model):
        lines.append(f"| {t.name} | {t.target} | {t.measured} | {'meets' if t.ok else '**shortfall**'} |")
    replicas = [t.replicas for t in ticks]
    lines += [
        "",
        f"Most replicas: {max(replicas, default=0)}; partitions per worker ranged from "
        f"{min((min(t.owned) for t in ticks if t.owned), default=0)} to "
        f"{max((max(t.owned) for t in ticks if t.owned), default=0)}.",
        "",
        "## Exactly once",
        "",
        "```",
        *format_verification(verification, unit="partition"),
        "```",
    ]
    return "\n".join(lines) + "\n"


def write(
    ticks: Sequence[Tick],
    o: Options,
    model: ScaledObjectModel,
    cooldown: float,
    verification: Verification,
    load_average: tuple[float, float, float],
) -> dict[str, Path]:
    o.out.mkdir(parents=True, exist_ok=True)
    files = {
        "csv": o.out / "autoscale-experiment.csv",
        "png": o.out / "autoscale-experiment.png",
        "md": o.out / "autoscale-experiment.md",
    }
    write_csv(ticks, files["csv"])
    write_png(ticks, o, model, files["png"])
    files["md"].write_text(render_markdown(ticks, o, model, cooldown, verification, load_average))
    return files
