"""``python -m chaos``: run the fault-injection scenarios and print (and save) the table."""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from collections.abc import Sequence

from chaos.report import ScenarioResult, render_markdown, render_table
from chaos.scenarios import CI, FULL, SCENARIOS, run_scenario
from chaos.server import ChaosServer
from projectionist.testing.reports import add_output_flags, publish

EXIT_OK = 0
EXIT_FAILED = 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m chaos", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="the trimmed timings the CI test uses (about 2 minutes)"
    )
    parser.add_argument(
        "--scenario",
        action="append",
        choices=list(SCENARIOS),
        metavar="NAME",
        help=f"run only this scenario (repeatable): {', '.join(repr(s) for s in SCENARIOS)}",
    )
    add_output_flags(parser, "chaos")
    parser.add_argument(
        "--keep-logs", action="store_true", help="keep the workers' logs even when every scenario passed"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    profile = CI if args.quick else FULL
    names = args.scenario or list(SCENARIOS)
    server = ChaosServer()
    log_root = server.base_dir / "logs"
    started = time.monotonic()
    results: list[ScenarioResult] = []
    server.start()
    try:
        version = server.server_version()
        for name in names:
            print(f"== {name} ({profile.name})", flush=True)
            result = run_scenario(name, server, profile, log_root)
            print(result.explain(), f"({result.duration_seconds:.0f} s)", sep="\n", flush=True)
            results.append(result)
    finally:
        server.destroy()
    total = time.monotonic() - started
    print()
    print(render_table(results))
    print(f"\n{sum(r.ok for r in results)}/{len(results)} scenarios passed in {total:.0f} s")
    args.out.mkdir(parents=True, exist_ok=True)
    report = args.out / "chaos.md"
    report.write_text(
        render_markdown(results, profile=profile.name, server_version=version, total_seconds=total)
    )
    print(f"results written to {report}")
    if args.publish:
        print(f"published: {', '.join(map(str, publish([report])))}")
    ok = all(r.ok for r in results)
    if ok and not args.keep_logs:
        shutil.rmtree(server.base_dir, ignore_errors=True)
    else:
        print(f"workers' logs: {log_root}")
    return EXIT_OK if ok else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
