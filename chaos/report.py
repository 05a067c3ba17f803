"""The results of a run, as the table the issue asks for and as ``docs/results/chaos.md``."""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from chaos.checks import Fold


@dataclass(frozen=True, slots=True)
class Check:
    """One thing that must hold after (or during) a fault."""

    what: str
    ok: bool
    detail: str = ""

    def __str__(self) -> str:
        return f"{'PASS' if self.ok else 'FAIL'} {self.what}" + (f": {self.detail}" if self.detail else "")


def outcome_failures(fold: Fold | None, error: str | None) -> list[str]:
    """Failures outside a run's checks: the reference fold, or an exception that ended the run."""
    failed = []
    if fold is None:
        failed.append("FAIL the read model was not compared with the events table")
    elif not fold.exact:
        failed.append(f"FAIL read model differs from the reference fold: {fold}")
    if error is not None:
        failed.append(f"ERROR {error}")
    return failed


@dataclass
class ScenarioResult:
    scenario: str
    faults: str = ""
    fold: Fold | None = None
    recovery_seconds: float | None = None
    recovery: str = ""
    readyz: str = ""
    checks: list[Check] = field(default_factory=list)
    duration_seconds: float = 0.0
    error: str | None = None
    logs: str = ""

    @property
    def ok(self) -> bool:
        return (
            self.error is None
            and self.fold is not None
            and self.fold.exact
            and all(c.ok for c in self.checks)
        )

    def failures(self) -> list[str]:
        return [str(c) for c in self.checks if not c.ok] + self.outcome_failures()

    def outcome_failures(self) -> list[str]:
        return outcome_failures(self.fold, self.error)

    def explain(self) -> str:
        """Every check, then the failures and the workers' logs: what a failing test prints."""
        lines = [f"scenario {self.scenario}: {'PASS' if self.ok else 'FAIL'}", *map(str, self.checks)]
        if not self.ok:
            lines += ["", *self.failures(), "", self.logs]
        return "\n".join(lines)


_COLUMNS = (
    "scenario",
    "faults injected",
    "events",
    "lost",
    "duplicated",
    "misordered",
    "recovery time",
    "/readyz during the fault",
    "result",
)


def _row(r: ScenarioResult) -> list[str]:
    fold = r.fold
    return [
        r.scenario,
        r.faults,
        f"{fold.events:,}" if fold else "-",
        str(fold.lost) if fold else "-",
        str(fold.duplicated) if fold else "-",
        str(fold.misordered) if fold else "-",
        r.recovery or "-",
        r.readyz or "-",
        "PASS" if r.ok else "FAIL",
    ]


def render_table(results: Sequence[ScenarioResult]) -> str:
    """A Markdown table: readable in a terminal, and pasted as is into the docs."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(_COLUMNS), line(["---"] * len(_COLUMNS)), *(line(_row(r)) for r in results)])


def machine_description(server_version: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for text in Path("/proc/cpuinfo").read_text().splitlines():
            if text.startswith("model name"):
                cpu = text.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{platform.node()}: {os.cpu_count()} CPUs ({cpu}), {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, PostgreSQL {server_version} (embedded)"
    )


def render_markdown(
    results: Sequence[ScenarioResult],
    *,
    profile: str,
    server_version: str,
    total_seconds: float,
    when: datetime | None = None,
) -> str:
    when = when or datetime.now(UTC)
    passed = sum(r.ok for r in results)
    lines = [
        "# Fault-injection results (`make chaos`)",
        "",
        f"- Date: {when.strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Machine: {machine_description(server_version)}",
        f"- Profile: {profile}; {len(results)} scenarios in {total_seconds:.0f} s; {passed} passed",
        "",
        render_table(results),
        "",
        "Events: rows in the events table at the end, every one of them compared with the read model. "
        "What each recovery time measures: the scenario table in the README's section "
        '"Fault injection: make chaos".',
        "",
        "## Checks per scenario",
        "",
    ]
    for r in results:
        lines += [f"### {r.scenario}", "", *(f"- {c}" for c in r.checks)]
        lines += [f"- {f}" for f in r.outcome_failures()]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
