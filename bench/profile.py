"""Profile one projectionist workload with pyinstrument: ``python -m bench.profile WORKLOAD``.

WORKLOAD is ``catch-up``, ``catch-up-telemetry``, ``batched-append`` or
``concurrent-append``. It starts its own embedded server (or uses
``BENCH_DATABASE_URL``), loads the events the workload needs, and prints
pyinstrument's call tree of the timed part only, plus the server's view from
``pg_stat_statements`` (calls, rows and mean time per statement), so you can
tell client CPU from round trips from server time. Add ``--html FILE`` to keep
the interactive report.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from bench.data import batched_plan, concurrent_plan
from bench.ours import Projectionist
from bench.server import BenchServer
from bench.throughput import _run_threads

WORKLOADS = ("catch-up", "catch-up-telemetry", "batched-append", "concurrent-append")


def server_statements(url: str, top: int = 12) -> str:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT calls, rows, round(mean_exec_time::numeric, 3), round(total_exec_time::numeric, 1), "
            "left(regexp_replace(query, '\\s+', ' ', 'g'), 90) FROM pg_stat_statements "
            "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            "ORDER BY total_exec_time DESC LIMIT %s",
            (top,),
        ).fetchall()
    lines = [f"{'calls':>8} {'rows':>9} {'mean ms':>8} {'total ms':>9}  query"]
    lines += [f"{c:>8} {r:>9} {m:>8} {t:>9}  {q}" for c, r, m, t, q in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    p.add_argument("workload", choices=WORKLOADS)
    p.add_argument("--events", type=int, default=100_000)
    p.add_argument("--html", type=Path)
    args = p.parse_args(argv)
    try:
        from pyinstrument import Profiler
    except ImportError:
        print("pyinstrument is not installed: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    with BenchServer(os.environ.get("BENCH_DATABASE_URL") or None) as server:
        ours = Projectionist(server.fresh_database("bench_profile"))
        ours.setup()
        with ours.connect() as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            conn.execute("ALTER DATABASE bench_profile SET pg_stat_statements.track = 'top'")
        plan = batched_plan(args.events)
        if args.workload.startswith("catch-up"):
            ours.append_batches(plan.transactions)
            ours.vacuum_analyze()
            ours.catch_up(read_model=False, batch_size=500, name="warmup")
        profiler = Profiler(interval=0.0005)
        with ours.connect() as conn:
            conn.execute("SELECT pg_stat_statements_reset()")
        result: Any
        if args.workload == "catch-up":
            profiler.start()
            result = ours.catch_up(read_model=False, batch_size=500, name="profiled")
            profiler.stop()
        elif args.workload == "catch-up-telemetry":
            from bench.telemetry_slot import telemetry

            with telemetry(ours.url, "profiled") as setup:
                if isinstance(setup, str):
                    print(setup, file=sys.stderr)
                    return 1
                profiler.start()
                result = ours.catch_up(
                    read_model=False,
                    batch_size=500,
                    name="profiled",
                    hooks=setup.hooks,
                    connect_fn=setup.connect_fn,
                )
                profiler.stop()
        elif args.workload == "batched-append":
            profiler.start()
            seconds = ours.append_batches(plan.transactions)
            profiler.stop()
            result = (plan.events, seconds)
        else:
            threads = concurrent_plan(4000, 8)
            profiler.start()
            seconds = _run_threads(ours, threads)
            profiler.stop()
            result = (4000, seconds)
        events, seconds = result
        print(f"{args.workload}: {events:,} events in {seconds:.2f} s = {events / seconds:,.0f} events/s\n")
        print(profiler.output_text(unicode=True, color=False, show_all=False))
        if args.html:
            args.html.write_text(profiler.output_html())
        print("server side (pg_stat_statements, this workload only):")
        print(server_statements(ours.url))
    return 0


if __name__ == "__main__":
    sys.exit(main())
