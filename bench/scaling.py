"""Workload 4's scaling efficiency, taken apart: the read path's own cost per event at N partitions.

``python -m bench.scaling`` loads the benchmark's events and builds the
partition indexes, then applies all N partitions of a no-op projection one
after another, in one process on one connection, for N = 1, 2 and 4, taking
turns. It prints the events per CPU-second of that process and its server
backend. With one partition running at a time nothing shares the cores, so
the ratio to N = 1 is the cost of the partitioned read itself: each
partition's rows are spread over every page of the table, so N partitions
visit each page N times. What workload 4 loses beyond this ratio, with all
N workers and their backends running at once, is the machine's cores being
shared by more processes than it has.
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections.abc import Sequence

from bench.data import batched_plan
from bench.ours import Projectionist
from bench.procs import cpu_seconds
from bench.projections import NoopProjection
from bench.results import markdown_table
from bench.server import BenchServer
from projectionist.consume import partition_indexes
from projectionist.consume.processor import Processor
from projectionist.partitioning import Partition
from projectionist.store.connection import connect
from projectionist.worker.gc_tuning import tune_for_throughput

COUNTS = (1, 2, 4)


def one_after_another(url: str, n: int, name: str, batch_size: int) -> tuple[int, float, float]:
    """Apply partitions 0..n-1 in turn; (events, this process's CPU, its backend's CPU) while applying.

    Each partition's first batch runs before the clock: a fresh connection's
    first reads fill its caches and plan the query, as workload 4's steady
    state leaves out.
    """
    events, client, server = 0, 0.0, 0.0
    for k in range(n):
        with connect(url, autocommit=True) as conn:
            processor = Processor(NoopProjection(f"{name}_{k}"), Partition(k, n), batch_size=batch_size)
            processor.start(conn)
            events += processor.run_batch(conn).applied
            backend = conn.info.backend_pid
            client_before, server_before = _cpu(os.getpid()), _cpu(backend)
            while True:
                outcome = processor.run_batch(conn)
                events += outcome.applied
                if not outcome.more:
                    break
            client += _cpu(os.getpid()) - client_before
            server += _cpu(backend) - server_before
    return events, client, server


def _cpu(pid: int) -> float:
    spent = cpu_seconds([pid])
    if spent is None:
        raise RuntimeError(f"the CPU time of process {pid} is not readable from /proc (is the server local?)")
    return spent


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__)
    p.add_argument("--events", type=int, default=100_000)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    tune_for_throughput()  # as `projectionist worker` does
    os.environ.pop("BENCH_GATE_KEY", None)
    runs: dict[int, list[tuple[int, float, float]]] = {n: [] for n in COUNTS}
    with BenchServer() as server:
        store = Projectionist(server.fresh_database("bench_scaling"))
        store.setup()
        store.append_batches(batched_plan(args.events).transactions)
        store.vacuum_analyze()
        with connect(store.url, autocommit=True) as conn:
            for n in COUNTS[1:]:
                partition_indexes.create_indexes(conn, n)
            conn.execute("CHECKPOINT")
        for rep in range(args.reps):
            for n in COUNTS:
                runs[n].append(one_after_another(store.url, n, f"scaling_{n}_{rep}", args.batch_size))
    rates = {n: statistics.median(e / (c + s) for e, c, s in runs[n]) for n in COUNTS}
    rows = [
        [
            str(n),
            f"{statistics.median(c / e for e, c, _ in runs[n]) * 1e6:.2f}",
            f"{statistics.median(s / e for e, _, s in runs[n]) * 1e6:.2f}",
            f"{rates[n]:,.0f}",
            f"{rates[n] / rates[1]:.2f}\N{MULTIPLICATION SIGN}",
        ]
        for n in COUNTS
    ]
    print(f"Partitions applied one after another, {args.events:,} events, median of {args.reps}:\n")
    print(
        "\n".join(
            markdown_table(
                [
                    "N",
                    "Worker CPU per event (µs)",
                    "Backend CPU per event (µs)",
                    "Events per CPU-second",
                    "vs N=1",
                ],
                rows,
            )
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
