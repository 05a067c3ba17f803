"""What one lag scrape costs while a group is far behind, with and without partition indexes.

``python -m bench.scrape_cost`` loads the benchmark's events once, registers
groups of 2, 4, 8 and 16 partitions that have applied nothing, and times
``lag.read_lag`` (the collector's two queries, lag.py) for each group, first
without partition indexes and then with them. Every process of a group runs
this on every Prometheus scrape. It also prints the lowest and highest
``projectionist_lag_events`` the scrape reported, against the cap: exact
through the indexes, approximate through the window without them.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence

from bench.data import batched_plan
from bench.ours import Projectionist
from bench.results import markdown_table
from bench.server import BenchServer
from projectionist.consume import lag, partition_indexes
from projectionist.consume.checkpoints import register_group
from projectionist.store.connection import connect
from projectionist.telemetry.store_collector import DEFAULT_LAG_COUNT_CAP

COUNTS = (2, 4, 8, 16)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scrape_cost", description=__doc__)
    p.add_argument("--events", type=int, default=400_000)
    p.add_argument("--cap", type=int, default=DEFAULT_LAG_COUNT_CAP)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    rows = []
    with BenchServer() as server:
        url = server.fresh_database("bench_scrape_cost")
        store = Projectionist(url)
        store.setup()
        store.append_batches(batched_plan(args.events).transactions)
        with connect(url, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE events")
            for n in COUNTS:
                register_group(conn, f"behind_{n}", n)
            for indexed in (False, True):
                if indexed:
                    for n in COUNTS:
                        partition_indexes.create_indexes(conn, n)
                for n in COUNTS:
                    name = f"behind_{n}"
                    lag.read_lag(conn, [name], args.cap)  # warm-up
                    took = []
                    for _ in range(args.reps):
                        started = time.perf_counter()
                        result = lag.read_lag(conn, [name], args.cap)
                        took.append(time.perf_counter() - started)
                    counts = [x.lag_events for x in result.partitions]
                    rows.append(
                        [
                            "yes" if indexed else "no",
                            str(n),
                            f"{statistics.median(took) * 1000:.1f}",
                            f"{min(counts):,} to {max(counts):,}",
                        ]
                    )
        version = server.setting("server_version")
    print(
        f"PostgreSQL {version}, {args.events:,} events behind, cap {args.cap:,}, "
        f"median of {args.reps} scrapes\n"
    )
    headers = ["partition indexes", "partitions", "one scrape (ms)", "lag_events reported"]
    print("\n".join(markdown_table(headers, rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
