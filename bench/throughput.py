"""Workloads 1-3 (batched append, concurrent appends, catch-up) and the telemetry-cost comparison.

Each workload warms every contestant up once, then runs the timed repetitions
round-robin (raw, projectionist, eventsourcing, Message DB, raw, ...) and
rotates who goes first, so a burst of background load hits everyone alike.
Appends run in this process; every catch-up runs in a fresh process of its own
(:mod:`bench.isolated`), as a consumer would.
"""

from __future__ import annotations

import statistics
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from typing import TypeVar

from bench.contestants import Contestant, Writer
from bench.data import BatchedPlan, Event
from bench.isolated import run_catch_up
from bench.results import Cell, Results

Log = Callable[[str], None]
_T = TypeVar("_T")


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    text = f"{type(e).__name__}: {text}"
    return text if len(text) <= 160 else text[:157] + "..."


class Failures:
    """Errors of raw or projectionist are failures of the bench; a peer's error only marks its cells."""

    def __init__(self, log: Log) -> None:
        self.log = log
        self.fatal: list[str] = []

    def record(self, contestant: Contestant, workload: str, e: BaseException, cell: Cell | None) -> None:
        message = one_line(e)
        self.log(f"  {contestant.label}: {workload} failed: {message}")
        if contestant.key in (
            "raw",
            "raw_unnest",
            "raw_copy",
            "projectionist",
            "projectionist_exact",
            "projectionist_notify",
        ):
            self.fatal.append(f"{contestant.label} / {workload}: {message}")
            self.log(traceback.format_exc())
        if cell is not None:
            cell.reason = f"error: {message}"
            cell.samples.clear()


def rotated(items: Sequence[_T], rep: int) -> list[_T]:
    k = rep % len(items) if items else 0
    return [*items[k:], *items[:k]]


def batched_append(
    contestants: Sequence[Contestant],
    plan: BatchedPlan,
    warmup: BatchedPlan,
    reps: int,
    results: Results,
    failures: Failures,
    log: Log,
) -> None:
    """Workload 1. Leaves every store holding ``plan``'s events (plus eventsourcing's Created events)."""
    log(f"1. batched append: {plan.events:,} events, {len(plan.transactions):,} transactions")
    _warm_then_time(
        contestants,
        "batched_append",
        "batched append",
        plan.events,
        reps,
        lambda c: c.append_batches(warmup.transactions),
        lambda c: c.append_batches(plan.transactions),
        results,
        failures,
        log,
    )


def concurrent_append(
    contestants: Sequence[Contestant],
    plan: list[list[Event]],
    warmup: list[list[Event]],
    reps: int,
    results: Results,
    failures: Failures,
    log: Log,
) -> None:
    """Workload 2: one thread per plan entry, each with its own connection, one event per transaction."""
    total = sum(len(p) for p in plan)
    log(f"2. concurrent single-event appends: {len(plan)} threads, {total:,} events")
    _warm_then_time(
        contestants,
        "concurrent_append",
        "concurrent append",
        total,
        reps,
        lambda c: _run_threads(c, warmup),
        lambda c: _run_threads(c, plan),
        results,
        failures,
        log,
    )


def _warm_then_time(
    contestants: Sequence[Contestant],
    workload: str,
    label: str,
    events: int,
    reps: int,
    warm_up: Callable[[Contestant], object],
    timed: Callable[[Contestant], float],
    results: Results,
    failures: Failures,
    log: Log,
) -> None:
    """One untimed warm-up per contestant, then ``reps`` timed rounds in rotating order.

    ``timed`` returns the seconds it took for ``events`` events; the store is
    reset before every run. A contestant whose warm-up failed is not timed.
    """
    live = []
    for c in contestants:
        try:
            c.reset()
            warm_up(c)
        except Exception as e:
            failures.record(c, f"{label} (warm-up)", e, results.cell(workload, c.key))
        else:
            live.append(c)
    for rep in range(reps):
        for c in rotated(live, rep):
            cell = results.cell(workload, c.key)
            if cell.reason:
                continue
            try:
                c.reset()
                seconds = timed(c)
                cell.samples.append(events / seconds)
                cell.events = events
                log(f"  rep {rep + 1}: {c.label:<40} {events / seconds:>10,.0f} events/s")
            except Exception as e:
                failures.record(c, label, e, cell)


def _run_threads(c: Contestant, plan: list[list[Event]]) -> float:
    writers: list[Writer] = [c.writer(t, events) for t, events in enumerate(plan)]
    errors: list[BaseException] = []
    # Every thread is connected and waiting before the clock starts.
    barrier = threading.Barrier(len(plan) + 1)

    def run(writer: Writer, events: list[Event]) -> None:
        try:
            barrier.wait()
            for agg, body in events:
                writer.write(agg, body)
        except BaseException as e:
            errors.append(e)

    threads = [
        threading.Thread(target=run, args=(w, p), daemon=True) for w, p in zip(writers, plan, strict=True)
    ]
    for t in threads:
        t.start()
    try:
        barrier.wait(timeout=60)
        started = time.perf_counter()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - started
    finally:
        for w in writers:
            w.close()
    if errors:
        raise errors[0]
    return elapsed


def reset_read_model(c: Contestant) -> None:
    with c.connect() as conn:
        conn.execute("TRUNCATE bench_read_model")


def catch_up(
    contestants: Sequence[Contestant],
    batch_size: int,
    reps: int,
    results: Results,
    failures: Failures,
    log: Log,
) -> None:
    """Workload 3, on what workload 1 left in each store (after VACUUM ANALYZE)."""
    for read_model in (False, True):
        workload = "catch_up_read_model" if read_model else "catch_up_noop"
        log(f"3. catch-up ({'read-model' if read_model else 'no-op'} projection), batches of {batch_size}")
        # Each run warms itself up first, in its own process (see bench.isolated).
        expected: dict[str, int] = {}
        for c in contestants:
            try:
                expected[c.key] = c.count()
            except Exception as e:
                failures.record(c, workload, e, results.cell(workload, c.key))
        for rep in range(reps):
            for c in rotated(contestants, rep):
                cell = results.cell(workload, c.key)
                if cell.reason:
                    continue
                try:
                    reset_read_model(c)
                    events, seconds, _ = run_catch_up(spec(c, read_model, batch_size, f"{workload}_r{rep}"))
                    if events != expected[c.key]:
                        # Never report a fast reader that skipped rows as fast.
                        raise RuntimeError(f"read {events} events but the store holds {expected[c.key]}")
                    cell.samples.append(events / seconds)
                    cell.events = events
                    log(f"  rep {rep + 1}: {c.label:<40} {events / seconds:>10,.0f} events/s")
                except Exception as e:
                    failures.record(c, workload, e, cell)


def spec(c: Contestant, read_model: bool, batch_size: int, name: str, **extra: object) -> dict[str, object]:
    """How :mod:`bench.isolated` rebuilds ``c`` in a fresh process."""
    return {
        "contestant": c.key,
        "url": c.url,
        "dbname": getattr(c, "dbname", None),
        "read_model": read_model,
        "batch_size": batch_size,
        "name": name,
        **extra,
    }


def telemetry_cost(
    ours: Contestant,
    batch_size: int,
    reps: int,
    results: Results,
    failures: Failures,
    log: Log,
) -> None:
    """The telemetry's cost: the same no-op catch-up in a worker-like process, with and without it."""
    from bench.telemetry_slot import telemetry

    without = results.telemetry.setdefault("without", Cell())
    with_t = results.telemetry.setdefault("with", Cell())
    try:
        with telemetry(ours.url, "bench_telemetry") as setup:
            description = setup if isinstance(setup, str) else setup.description
        if isinstance(setup, str):
            log(f"telemetry cost: not measured: {setup}")
            without.reason = with_t.reason = setup
            return
        log(f"telemetry cost: {description}")
        results.notes.append(f"telemetry cost measured with {description}")
        variants = [("without", without, False), ("with", with_t, True)]
        cpu: dict[str, list[float]] = {"without": [], "with": []}
        for rep in range(reps):
            for label, cell, flag in variants if rep % 2 == 0 else variants[::-1]:
                events, seconds, used = run_catch_up(
                    spec(ours, False, batch_size, f"telemetry_{label}_r{rep}", telemetry=flag)
                )
                cell.samples.append(events / seconds)
                cell.events = events
                cpu[label].append(used / events * 1e6)
                rate = events / seconds
                log(f"  rep {rep + 1}: {label:<8} {rate:>10,.0f} events/s, {used:.2f} s client CPU")
        with_cpu, without_cpu = statistics.median(cpu["with"]), statistics.median(cpu["without"])
        results.notes.append(
            f"telemetry cost in client CPU (all threads, less sensitive to machine load than wall time): "
            f"{without_cpu:.1f} µs/event without, {with_cpu:.1f} µs/event with "
            f"({with_cpu / without_cpu - 1:+.0%})"
        )
    except Exception as e:
        failures.record(ours, "telemetry cost", e, with_t)
        without.reason = with_t.reason
