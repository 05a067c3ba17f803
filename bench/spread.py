"""``python -m bench.spread REPORT.md ...``: each target's spread over several full runs.

One run on a noisy machine decides little for a target within a few percent
of its line. This reads the "Targets" table of each report that ``make bench``
kept (``out/bench/<date>-<HHMM>.md``) and prints one Markdown table: per
target, the lowest and highest measured value and in how many runs it was met.
Give it runs of the same code; it does not check that they are.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.results import markdown_table

_NUMBER = re.compile(r"\d+(?:\.\d+)?")


class ReportError(ValueError):
    """A file that is not a full ``make bench`` report."""


@dataclass
class Spread:
    target: str
    line: str
    values: list[tuple[float, str]] = field(default_factory=list)  # (value, as shown)
    ok: int = 0
    not_measured: int = 0

    def row(self) -> list[str]:
        runs = len(self.values) + self.not_measured
        low = min(self.values)[1] if self.values else "—"
        high = max(self.values)[1] if self.values else "—"
        return [self.target, self.line, low, high, f"{self.ok} of {runs}", str(self.not_measured)]


def targets_of(text: str, name: str = "report") -> list[tuple[str, str, str, str]]:
    """(target, measured, target line, result) for each row of a report's Targets table."""
    if "# projectionist benchmark: full run" not in text:
        raise ReportError(f"{name}: not a full-run report (quick runs judge nothing)")
    rows: list[tuple[str, str, str, str]] = []
    in_table = False
    for line in text.splitlines():
        if line.startswith("## Targets"):
            in_table = True
            continue
        if in_table and line.startswith("## "):
            break
        if in_table and line.startswith("| ") and not line.startswith(("| Target |", "|---")):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) == 4:
                rows.append((cells[0], cells[1], cells[2], cells[3]))
    if not rows:
        raise ReportError(f"{name}: no Targets table")
    return rows


def spread(reports: Sequence[tuple[str, str]]) -> list[Spread]:
    """Fold the Targets tables of ``(name, text)`` reports, keeping the first report's order."""
    by_target: dict[str, Spread] = {}
    for name, text in reports:
        for target, measured, line, result in targets_of(text, name):
            s = by_target.setdefault(f"{target} {line}", Spread(target, line))
            if result.startswith("not measured") or measured == "—":
                s.not_measured += 1
                continue
            number = _NUMBER.search(measured)
            if number is None:
                raise ReportError(f"{name}: cannot read {measured!r} for {target!r}")
            s.values.append((float(number.group()), measured))
            s.ok += result == "ok"
    return list(by_target.values())


def render(spreads: Sequence[Spread], runs: int) -> str:
    header = ["Target", "Line", "Lowest", "Highest", "Runs ok", "Not measured"]
    rows = [s.row() for s in spreads]
    if not any(s.not_measured for s in spreads):
        header, rows = header[:-1], [r[:-1] for r in rows]
    return "\n".join([f"Spread of {runs} full run(s):", "", *markdown_table(header, rows)])


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.spread", description=__doc__)
    p.add_argument("reports", nargs="+", type=Path, help="full-run reports: out/bench/<date>-*.md")
    args = p.parse_args(argv)
    try:
        reports = [(str(path), path.read_text()) for path in args.reports]
        print(render(spread(reports), len(reports)))
    except (OSError, ReportError) as e:
        print(f"bench.spread: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
