"""An incident's dashboard panels as one PNG, drawn from Prometheus range queries with matplotlib.

The panels, their titles, queries, legends, units and value mappings are
read from the generated dashboard JSON (compose/grafana/dashboards/), never
copied: the PNG shows what Grafana would. The triage table is drawn as it
stood when the cause was named; the cause over time as coloured bands; every
other panel as lines. The fault's span is shaded.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from chaos.fleet import ROOT
from matplotlib.axes import Axes
from matplotlib.patches import Patch

from incidents.lab import INTERVAL
from projectionist.testing.prometheus import Prometheus

if TYPE_CHECKING:
    from incidents.catalog import Incident

DASHBOARD = ROOT / "compose" / "grafana" / "dashboards" / "projection-workers.json"
#: Grafana's named colours, as its palette draws them.
COLORS = {
    "green": "#73bf69",
    "red": "#f2495c",
    "semi-dark-red": "#e02f44",
    "dark-red": "#c4162a",
    "orange": "#ff9830",
    "dark-orange": "#fa6400",
    "yellow": "#fade2a",
    "dark-yellow": "#e0b400",
    "blue": "#5794f2",
    "light-blue": "#8ab8ff",
    "purple": "#b877d9",
    "dark-purple": "#8f3bb8",
}
#: Every PNG starts with these.
FIRST_PANELS = ("Triage", "Cause over time", "Lag in seconds per worker")
_UNITS = {"s": "seconds", "ops": "per second", "percentunit": "ratio", "short": "", "none": ""}


def dashboard_panels(path: Path = DASHBOARD) -> dict[str, dict[str, Any]]:
    """Every panel of the dashboard by title (rows' nested panels included)."""
    out: dict[str, dict[str, Any]] = {}
    for panel in json.loads(path.read_text())["panels"]:
        out[panel["title"]] = panel
        for nested in panel.get("panels", []):
            out[nested["title"]] = nested
    return out


def substitute(expr: str) -> str:
    """Every variable set to match all, ``$__rate_interval`` to Grafana's floor of four scrapes."""
    expr = expr.replace("$__rate_interval", f"{4 * INTERVAL:g}s")
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def legend(fmt: str, labels: dict[str, str], expr: str) -> str:
    if not fmt or fmt == "__auto":
        return ", ".join(f"{k}={v}" for k, v in sorted(labels.items())) or expr[:40]
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt).strip()


def _mappings(panel: dict[str, Any], field_name: str | None = None) -> dict[str, dict[str, Any]]:
    """The value mappings of the panel's defaults, or of one field's override."""
    if field_name is None:
        found = panel["fieldConfig"]["defaults"].get("mappings", [])
    else:
        found = []
        for override in panel["fieldConfig"].get("overrides", []):
            if override["matcher"].get("options") == field_name:
                for prop in override["properties"]:
                    if prop["id"] == "mappings":
                        found = prop["value"]
    options: dict[str, dict[str, Any]] = {}
    for mapping in found:
        options.update(mapping.get("options", {}))
    return options


def _shade(ax: Axes, fault: tuple[float, float]) -> None:
    ax.axvspan(fault[0], fault[1], color="#f2cc0c", alpha=0.15, lw=0)
    ax.axvline(fault[0], color="#b08b00", lw=0.8, ls="--")
    ax.axvline(fault[1], color="#b08b00", lw=0.8, ls=":")


def _lines(
    ax: Axes, prometheus: Prometheus, panel: dict[str, Any], window: tuple[float, float, float]
) -> int:
    start, end, origin = window
    drawn = 0
    for target in panel.get("targets", []):
        expr = substitute(target["expr"])
        for series in prometheus.query_range(expr, start, end, INTERVAL):
            points = [(t - origin, v) for t, v in series.points if math.isfinite(v)]
            if not points:
                continue
            # A gap in the data (a scrape that failed, a series that went away) stays a gap.
            xs: list[float] = []
            ys: list[float] = []
            for t, v in points:
                if xs and t - xs[-1] > 2.5 * INTERVAL:
                    xs.append(math.nan)
                    ys.append(math.nan)
                xs.append(t)
                ys.append(v)
            ax.plot(xs, ys, lw=1.2, label=legend(target.get("legendFormat", ""), series.labels, expr))
            drawn += 1
    unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
    ax.set_ylabel(_UNITS.get(unit, unit))
    if drawn:
        ax.legend(fontsize=6, loc="upper left", ncols=2, framealpha=0.6)
    return drawn


def _bands(
    ax: Axes, prometheus: Prometheus, panel: dict[str, Any], window: tuple[float, float, float]
) -> int:
    """A state timeline: one band per series, coloured by the value mapping."""
    start, end, origin = window
    mappings = _mappings(panel)
    (target,) = panel["targets"]
    expr = substitute(target["expr"])
    series = sorted(
        prometheus.query_range(expr, start, end, INTERVAL),
        key=lambda s: legend(target.get("legendFormat", ""), s.labels, expr),
    )
    seen: dict[str, str] = {}
    for row, s in enumerate(series):
        for t, v in s.points:
            mapping = mappings.get(str(int(v)), {})
            color = COLORS.get(str(mapping.get("color", "")), "#999999")
            seen[str(mapping.get("text", v))] = color
            ax.broken_barh([(t - origin, INTERVAL)], (row - 0.4, 0.8), color=color, lw=0)
    ax.set_yticks(
        range(len(series)), [legend(target.get("legendFormat", ""), s.labels, expr) for s in series]
    )
    ax.legend(
        handles=[Patch(color=c, label=text) for text, c in seen.items()],
        fontsize=6,
        loc="upper left",
        ncols=4,
    )
    return len(series)


def _table(ax: Axes, prometheus: Prometheus, panel: dict[str, Any], at: float) -> int:
    """The triage table as it stood at ``at``: the panel's queries merged on the partition's labels."""
    organize = next(t for t in panel["transformations"] if t["id"] == "organize")["options"]
    renames: dict[str, str] = organize["renameByName"]
    hidden = {k for k, v in organize["excludeByName"].items() if v}
    rows: dict[tuple[str, str], dict[str, str]] = {}
    for target in panel["targets"]:
        value_column = f"Value #{target['refId']}"
        for sample in prometheus.query(substitute(target["expr"]), at=at):
            key = (sample.labels.get("projection", ""), sample.labels.get("worker", ""))
            row = rows.setdefault(key, {"worker": key[1]})
            for label, value in sample.labels.items():
                if label in renames:
                    row[renames[label]] = value
            if value_column not in hidden and value_column in renames:
                column = renames[value_column]
                row[column] = f"{sample.value:.1f}" if column.endswith("(s)") else f"{sample.value:g}"
            if value_column == "Value #E":
                row["_rank"] = f"{sample.value:g}"
    columns = ["worker", *renames.values()]
    maps = {name: _mappings(panel, name) for name in ("state", "cause", "failing at position")}
    cells, colors = [], []
    for row in sorted(rows.values(), key=lambda r: -float(r.get("_rank", "0"))):
        line, tint = [], []
        for column in columns:
            raw = row.get(column, "")
            mapping = maps.get(column, {}).get(raw, {})
            line.append(str(mapping.get("text", raw)))
            tint.append(COLORS.get(str(mapping.get("color", "")), "white") if column == "cause" else "white")
        cells.append(line)
        colors.append(tint)
    ax.axis("off")
    if cells:
        table = ax.table(
            cellText=cells, colLabels=columns, cellColours=colors, loc="center", cellLoc="center"
        )
        table.auto_set_font_size(False)
        table.set_fontsize(8)
        table.scale(1, 1.4)
    return len(cells)


def render_incident(
    prometheus: Prometheus,
    incident: Incident,
    out_dir: Path,
    times: tuple[float, float, float, float],
    *,
    table_at: float | None = None,
) -> Path:
    """``out_dir/<slug>.png``: the incident's panels over ``times`` (ready, fault, removed, end)."""
    ready_at, fault_at, removed_at, end = times
    panels = dashboard_panels()
    titles = [*FIRST_PANELS, *(t for t in incident.panels if t not in FIRST_PANELS)]
    missing = [t for t in titles if t not in panels]
    if missing:
        raise ValueError(f"no panel titled {missing} in {DASHBOARD.name}")
    charts = titles[2:]
    rows = 1 + math.ceil(len(charts) / 2)
    fig = plt.figure(figsize=(15, 3.4 * rows), constrained_layout=True)
    grid = fig.add_gridspec(rows, 2)
    window = (ready_at, end, fault_at)
    fault = (0.0, removed_at - fault_at)
    table_ax = fig.add_subplot(grid[0, 0])
    when = table_at if table_at is not None else (fault_at + removed_at) / 2
    _table(table_ax, prometheus, panels["Triage"], when)
    table_ax.set_title(f"Triage, {when - fault_at:.0f} s after the fault", fontsize=10)
    bands_ax = fig.add_subplot(grid[0, 1])
    _bands(bands_ax, prometheus, panels["Cause over time"], window)
    bands_ax.set_title("Cause over time", fontsize=10)
    _shade(bands_ax, fault)
    for i, title in enumerate(charts):
        ax = fig.add_subplot(grid[1 + i // 2, i % 2])
        _lines(ax, prometheus, panels[title], window)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("seconds from the fault")
        ax.grid(alpha=0.3)
        _shade(ax, fault)
    bands_ax.set_xlabel("seconds from the fault")
    fig.suptitle(f"{incident.title}: expected cause {incident.cause}", fontsize=12)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{incident.slug}.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
