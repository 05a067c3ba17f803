"""What a partition and the lock fence cost (``make elastic-bench``), for choosing a partition count.

Two costs grow with the count: every append maintains one partial index per
partition (``events_partition_<N>_<k>_idx``), and an idle worker reads each
partition it owns once per poll. Measured on a cluster of its own: batched
appends (100 events a transaction) with 0, 16 and 64 partition indexes, and
the time of one empty batch (a poll that finds nothing), median of 3.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

from chaos.server import ChaosServer
from projectionist.consume import membership
from projectionist.consume.checkpoints import load_checkpoint, register_group, save_checkpoint
from projectionist.consume.partition_indexes import create_indexes
from projectionist.consume.processor import Processor
from projectionist.demo.sample_events import append_sample_events
from projectionist.demo.sample_projection import ScalableProjection
from projectionist.partitioning import Partition
from projectionist.records import Position
from projectionist.store.connection import connect

COUNTS = (0, 16, 64)


@dataclass(frozen=True, slots=True)
class PartitionCost:
    #: Partition count -> events appended per second (median of the repetitions).
    append_rate: dict[int, float]
    #: Seconds of one empty batch of one partition (a poll that finds nothing).
    empty_batch_seconds: float


def _append_rate(url: str, partitions: int, events: int) -> float:
    with connect(url, autocommit=True) as conn:
        if partitions:
            create_indexes(conn, partitions)
        started = time.perf_counter()
        for _ in append_sample_events(conn, count=events, aggregates=1000, batch_size=100):
            pass
        return events / (time.perf_counter() - started)


def _empty_batch(url: str) -> float:
    with connect(url, autocommit=True) as conn:
        register_group(conn, ScalableProjection.name, 16)
        create_indexes(conn, 16)
        conn.execute("ANALYZE events")
        processor = Processor(ScalableProjection(), Partition(3, 16), batch_size=100, lock_fence=True)
        processor.start(conn)
        timings = []
        for _ in range(500):
            started = time.perf_counter()
            processor.run_batch(conn)
            timings.append(time.perf_counter() - started)
        return statistics.median(timings)


def measure(repetitions: int = 3, events: int = 20_000) -> PartitionCost:
    server = ChaosServer()
    server.start()
    try:
        rates: dict[int, list[float]] = {n: [] for n in COUNTS}
        for r in range(repetitions):
            for n in COUNTS:
                url = server.scenario_database(f"cost_{n}_{r}")
                rates[n].append(_append_rate(url, n, events))
        empty = _empty_batch(server.scenario_database("cost_poll"))
    finally:
        server.destroy()
    return PartitionCost({n: statistics.median(v) for n, v in rates.items()}, empty)


def fence_cost(url: str, rounds: int = 400) -> tuple[float, float]:
    """Median microseconds of a checkpoint update without and with the lock fence.

    A projection of its own on a connection of its own, holding its one
    partition's lock, next to whatever else holds locks on the server (the
    elastic run's members); updates with and without the fence alternate,
    each timed alone inside its transaction.
    """
    partition = Partition(0, 1)
    timings: dict[bool, list[float]] = {False: [], True: []}
    with connect(url, application_name="chaos:fence-cost", autocommit=True) as conn:
        register_group(conn, "fence_probe", 1)
        position = load_checkpoint(conn, "fence_probe", partition)
        assert membership.try_acquire(conn, "fence_probe", 1, [0]) == [0]
        for i in range(rounds * 2):
            fence = bool(i % 2)
            new = Position(position.transaction_id, position.global_position + 1)
            with conn.transaction():
                started = time.perf_counter()
                save_checkpoint(conn, "fence_probe", partition, position, new, 0, lock_fence=fence)
                timings[fence].append(time.perf_counter() - started)
            position = new
    return statistics.median(timings[False]) * 1e6, statistics.median(timings[True]) * 1e6


def lines(cost: PartitionCost) -> list[str]:
    base = cost.append_rate[0]
    rates = ", ".join(
        f"{n} indexes {rate:,.0f} events/s ({rate / base:.2f}x)" for n, rate in cost.append_rate.items()
    )
    return [
        f"- Batched appends (100 events a transaction), by partition indexes: {rates}",
        f"- An empty batch (a poll that finds nothing) of one partition: "
        f"{cost.empty_batch_seconds * 1000:.2f} ms; an idle worker owning all 16 partitions spends about "
        f"{cost.empty_batch_seconds * 16 * 1000:.0f} ms per POLL_INTERVAL on them",
    ]
