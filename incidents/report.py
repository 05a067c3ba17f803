"""An incident's result, and the run's Markdown table (``out/incidents/incidents.md``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from chaos.checks import Fold
from chaos.report import Check, machine_description, outcome_failures


@dataclass
class IncidentResult:
    slug: str
    title: str
    expected_cause: str
    fault: str = ""
    #: Seconds from the fault to the triage table naming the cause on every affected partition.
    named_after: float | None = None
    #: "WorkerDown (7 s)", by first firing, seconds from the fault.
    fired: list[str] = field(default_factory=list)
    false_alerts: list[str] = field(default_factory=list)
    wrong_causes: list[str] = field(default_factory=list)
    #: Seconds from the fault's removal to no alert firing, every cause ok and every event applied.
    resolved_after: float | None = None
    fold: Fold | None = None
    checks: list[Check] = field(default_factory=list)
    png: str = ""
    error: str | None = None
    duration_seconds: float = 0.0
    logs: str = ""

    @property
    def ok(self) -> bool:
        return (
            self.error is None
            and self.fold is not None
            and self.fold.exact
            and not self.false_alerts
            and not self.wrong_causes
            and self.resolved_after is not None
            and (self.named_after is not None or self.expected_cause == "ok")
            and all(c.ok for c in self.checks)
        )

    def failures(self) -> list[str]:
        return [str(c) for c in self.checks if not c.ok] + self.outcome_failures()

    def outcome_failures(self) -> list[str]:
        return outcome_failures(self.fold, self.error)

    def explain(self) -> str:
        lines = [
            f"incident {self.slug}: {'PASS' if self.ok else 'FAIL'} ({self.fault})",
            *map(str, self.checks),
        ]
        if not self.ok:
            lines += ["", *self.outcome_failures(), "", self.logs]
        return "\n".join(lines)


_COLUMNS = (
    "incident",
    "expected cause",
    "cause named",
    "alerts fired (s after the fault)",
    "false alerts",
    "resolved after",
    "lost / duplicated",
    "result",
)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} s"


def _row(r: IncidentResult, pngs: str) -> list[str]:
    if r.expected_cause == "ok":
        named = "ok throughout" if not r.wrong_causes else "no"
    else:
        named = "no" if r.named_after is None else f"yes, after {r.named_after:.0f} s"
    fold = "-" if r.fold is None else f"{r.fold.lost} / {r.fold.duplicated}"
    return [
        f"[{r.title}]({pngs}{r.slug}.png)" if r.png else r.title,
        f"`{r.expected_cause}`",
        named,
        ", ".join(r.fired) or "none",
        ", ".join(r.false_alerts) or "none",
        _seconds(r.resolved_after),
        fold,
        "PASS" if r.ok else "FAIL",
    ]


def render_table(results: Sequence[IncidentResult], *, links: bool = True, pngs: str = "") -> str:
    """The table; with ``links``, each incident links to its PNG at ``pngs`` + slug + ``.png``."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    rows = []
    for r in results:
        row = _row(r, pngs)
        if not links:
            row[0] = r.title
        rows.append(line(row))
    return "\n".join([line(_COLUMNS), line(["---"] * len(_COLUMNS)), *rows])


def render_markdown(
    results: Sequence[IncidentResult],
    *,
    profile: str,
    factor: float,
    interval: float,
    server_version: str,
    total_seconds: float,
    when: datetime | None = None,
    pngs: str = "",
) -> str:
    """The run's page: its set-up, the table and every check; PNGs linked at ``pngs`` + slug."""
    when = when or datetime.now(UTC)
    passed = sum(r.ok for r in results)
    lines = [
        "# Incident lab results (`make incidents`)",
        "",
        f"- Date: {when.strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Machine: {machine_description(server_version)}",
        f"- Profile: {profile}; {len(results)} incidents in {total_seconds / 60:.0f} min; {passed} passed",
        f"- Time scale: every `for:`, every rule group's interval and the freshness objective's windows "
        f"divided by {factor:g}; scrape and evaluation every {interval:g} s. Thresholds as shipped.",
        "",
        render_table(results, pngs=pngs),
        "",
        "Cause named: seconds from the fault until the triage table showed the expected cause on every "
        "partition it affects. Alerts fired: seconds from the fault to the first firing; each fired within "
        "its scaled `for:` plus two evaluation intervals of turning pending. Resolved after: seconds from "
        "the fault's removal until no alert fired, every partition was `ok` and every event was applied. "
        "Lost / duplicated: the read model compared with a fold of the events table, as `make chaos` does.",
        "",
        "## Checks per incident",
        "",
    ]
    for r in results:
        lines += [f"### {r.title}", "", f"Fault: {r.fault}.", "", *(f"- {c}" for c in r.checks)]
        lines += [f"- {f}" for f in r.outcome_failures()]
        if r.fold is not None:
            lines.append(
                f"- {r.fold.events:,} events; lost {r.fold.lost}, duplicated {r.fold.duplicated}, "
                f"misordered {r.fold.misordered}, applied by the wrong partition {r.fold.wrong_worker}"
            )
        if r.png:
            lines += ["", f"![{r.title}]({pngs}{r.slug}.png)"]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
