"""Render every dashboard to JSON and write it into Grafana's provisioning folder (or check it)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from grafana_foundation_sdk.builders.dashboard import Dashboard
from grafana_foundation_sdk.cog.encoder import JSONEncoder

from dashboards import event_store, workers

ROOT = Path(__file__).resolve().parent.parent
#: Mounted read-only into Grafana at /var/lib/grafana/dashboards (see compose/docker-compose.yml).
OUTPUT_DIR = ROOT / "compose" / "grafana" / "dashboards"

#: File name -> builder. The file names are what Grafana's file provider loads.
DASHBOARDS: dict[str, Callable[[], Dashboard]] = {
    "projection-workers.json": workers.build,
    "event-store-and-load.json": event_store.build,
}


def render(build: Callable[[], Dashboard]) -> str:
    """The dashboard as stable JSON text: sorted keys, two-space indent, final newline."""
    return JSONEncoder(sort_keys=True, indent=2).encode(build().build()) + "\n"


def render_all() -> dict[str, str]:
    return {name: render(build) for name, build in DASHBOARDS.items()}


def stale_files(output_dir: Path = OUTPUT_DIR) -> list[str]:
    """Names of dashboard files that are missing or differ from what the code generates."""
    stale = []
    for name, text in render_all().items():
        path = output_dir / name
        if not path.exists() or path.read_text() != text:
            stale.append(name)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dashboards", description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the committed JSON is out of date")
    parser.add_argument("--output-dir", type=Path, default=OUTPUT_DIR)
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files(args.output_dir)
        for name in stale:
            print(f"{args.output_dir / name} is out of date: run `make dashboards`", file=sys.stderr)
        return 1 if stale else 0
    args.output_dir.mkdir(parents=True, exist_ok=True)
    for name, text in render_all().items():
        path = args.output_dir / name
        changed = not path.exists() or path.read_text() != text
        path.write_text(text)
        shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        print(f"{'wrote' if changed else 'unchanged'} {shown}")
    return 0
