"""``python -m incidents``: stage every incident, print (and save) the table, draw each incident's PNG."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from incidents.catalog import BY_SLUG, Incident, select
from incidents.lab import FACTOR, FULL, INTERVAL, QUICK, Lab, Profile
from incidents.report import IncidentResult, render_markdown, render_table
from incidents.run import run_incident
from projectionist.testing.reports import PUBLISHED, add_output_flags, publish

EXIT_OK = 0
EXIT_FAILED = 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m incidents", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="the CI subset with shorter timings (about 3 minutes)"
    )
    parser.add_argument(
        "--incident",
        action="append",
        choices=list(BY_SLUG),
        metavar="NAME",
        help=f"run only this incident (repeatable): {', '.join(BY_SLUG)}",
    )
    add_output_flags(parser, "incidents")
    parser.add_argument(
        "--keep-logs", action="store_true", help="keep the logs and Prometheus data even when all passed"
    )
    return parser


def run_lab(
    incidents: Sequence[Incident], profile: Profile, png_dir: Path, *, keep_logs: bool = False
) -> tuple[list[IncidentResult], str]:
    """Run ``incidents`` on one lab; their results and the server's version."""
    results: list[IncidentResult] = []
    with Lab(keep=keep_logs) as lab:
        version = lab.server_version()
        for incident in incidents:
            print(f"== {incident.slug}: {incident.title} ({profile.name})", flush=True)
            result = run_incident(lab, incident, profile, lab.workdir / "logs", png_dir)
            print(result.explain(), f"({result.duration_seconds:.0f} s)", sep="\n", flush=True)
            results.append(result)
        if not all(r.ok for r in results):
            lab.keep = True
            print(f"logs and Prometheus data: {lab.workdir}")
    return results, version


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    profile = QUICK if args.quick else FULL
    incidents = select(args.incident, quick=args.quick)
    out: Path = args.out
    started = time.monotonic()
    results, version = run_lab(incidents, profile, out, keep_logs=args.keep_logs)
    ok = all(r.ok for r in results)
    total = time.monotonic() - started
    print()
    print(render_table(results, links=False))
    print(f"\n{sum(r.ok for r in results)}/{len(results)} incidents passed in {total:.0f} s")

    def page(pngs: str) -> str:
        return render_markdown(
            results,
            profile=profile.name,
            factor=FACTOR,
            interval=INTERVAL,
            server_version=version,
            total_seconds=total,
            pngs=pngs,
        )

    out.mkdir(parents=True, exist_ok=True)
    report = out / "incidents.md"
    report.write_text(page(""))
    print(f"results written to {report}, one PNG per incident beside it")
    if args.publish:
        # The docs keep the PNGs in a folder of their own beside the page.
        staged = out / "publish" / "incidents.md"
        staged.parent.mkdir(exist_ok=True)
        staged.write_text(page("incidents/"))
        copies = publish([staged])
        copies += publish([out / f"{r.slug}.png" for r in results if r.png], into=PUBLISHED / "incidents")
        print(f"published: {', '.join(map(str, copies))}")
    return EXIT_OK if ok else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
