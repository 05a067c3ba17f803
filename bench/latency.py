"""Workload 5: append-to-applied latency at steady rates, with 4 ``projectionist worker`` processes live.

**What is measured.** For every event: the commit time of the projection
transaction that applied it minus the commit time of the append transaction
that wrote it, both read with ``pg_xact_commit_timestamp`` (the server runs
with ``track_commit_timestamp = on``). Both ends are real commits on one clock:
the interval covers the NOTIFY, the worker waking, the gap-safe read, applying
and the projection's own commit with its WAL flush, and nothing else. No
observer polls for visibility, so no polling delay is added, and the appender's
own scheduling cannot hide a slow worker (the latency starts at the commit,
whenever that happened).

If the server has ``track_commit_timestamp`` off (``BENCH_DATABASE_URL``), the
fallback is ``clock_timestamp()`` at apply minus ``created_at`` at insert,
which leaves out both commits, and the report says so.

**What the wake-ups cost.** Appends use the default ``notify``: a NOTIFY only
while a worker sleeps. A connection of the benchmark LISTENs and counts the
notifications that came from the appender's backend, and the CPU time of the
workers and their server backends is read over each run, so the table shows
both sides of the trade: how often writers paid for a NOTIFY, and what the
workers' polling cost.

**The load.** An open-loop appender commits every 5 ms with the events due by
then (1 per commit at 200/s, 2-3 at 500/s, 10 at 2000/s), each to a different
aggregate out of 400, so all four partitions get work.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

from bench.data import EVENT_TYPE, payload
from bench.procs import Children, backend_pids, bench_env, cpu_seconds, worker_args
from bench.projections import LATENCY_DDL
from bench.results import LatencyRun, Results
from bench.throughput import Failures, one_line
from projectionist.records import NewEvent
from projectionist.store.appending import StreamAppend, append_many
from projectionist.store.connection import NOTIFY_CHANNEL, Connection, connect

Log = Callable[[str], None]

WORKERS = 4
TICK = 0.005
AGGREGATES = 400
PROJECTION = "bench_latency"

_EXACT = (
    "SELECT extract(epoch FROM pg_xact_commit_timestamp(a.xmin) - pg_xact_commit_timestamp(e.xmin)) "
    "FROM events e JOIN bench_applied a ON a.global_position = e.global_position "
    "WHERE e.global_position BETWEEN %s AND %s"
)
_FALLBACK = (
    "SELECT extract(epoch FROM a.applied_at - e.created_at) "
    "FROM events e JOIN bench_applied a ON a.global_position = e.global_position "
    "WHERE e.global_position BETWEEN %s AND %s"
)


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return math.nan
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))]


def pace(conn: Connection, rate: float, seconds: float, seed: int) -> tuple[int, int, int, float, int]:
    """Append at ``rate`` events/s for ``seconds``.

    Returns (first, last position, events, elapsed, append transactions).
    """
    import random

    rng = random.Random(seed)
    next_aggregate = 0
    sent = 0
    first: int | None = None
    last = 0
    started = time.perf_counter()
    tick = 0
    commits = 0
    while True:
        now = time.perf_counter() - started
        if now >= seconds:
            break
        due = min(int(now * rate) + 1 - sent, AGGREGATES)
        if due > 0:
            appends = []
            for _ in range(due):
                agg = f"l{next_aggregate % AGGREGATES:03d}"
                next_aggregate += 1
                appends.append(StreamAppend(agg, [NewEvent(EVENT_TYPE, payload(rng, agg))]))
            for result in append_many(conn, appends):
                first = (
                    min(first, *result.global_positions)
                    if first is not None
                    else min(result.global_positions)
                )
                last = max(last, *result.global_positions)
            sent += due
            commits += 1
        tick += 1
        delay = started + tick * TICK - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
    return first or 0, last, sent, time.perf_counter() - started, commits


def wait_applied(conn: Connection, lo: int, hi: int, count: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        row = conn.execute(
            "SELECT count(*) FROM bench_applied WHERE global_position BETWEEN %s AND %s", (lo, hi)
        ).fetchone()
        applied = int(row[0]) if row else 0
        if applied >= count:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {applied} of {count} events applied after {timeout:.0f} s")
        time.sleep(0.05)


def latency(
    *,
    url: str,
    rates: tuple[float, ...],
    seconds: float,
    reps: int,
    batch_size: int,
    log_dir: Path,
    results: Results,
    failures: Failures,
    log: Log,
    local_server: bool = False,
) -> None:
    log(
        f"5. append-to-applied latency: {WORKERS} workers live, "
        f"{', '.join(f'{r:g}' for r in rates)} events/s, {seconds:g} s each"
    )
    try:
        with connect(url, autocommit=True) as conn, connect(url, autocommit=True) as listener:
            conn.execute(LATENCY_DDL)
            row = conn.execute("SELECT current_setting('track_commit_timestamp')").fetchone()
            exact = bool(row and row[0] == "on")
            query = _EXACT if exact else _FALLBACK
            results.latency_method = (
                "commit time of the projection's transaction minus commit time of the append's transaction "
                "(pg_xact_commit_timestamp, one server clock)"
                if exact
                else "FALLBACK (track_commit_timestamp is off): clock_timestamp() at apply minus "
                "created_at at "
                "insert; leaves out both commits"
            )
            with Children(log_dir) as children:
                env = bench_env(url, BENCH_PROJECTION_NAME=PROJECTION)
                for k in range(WORKERS):
                    children.spawn(
                        worker_args(k, WORKERS, "bench.projections:LatencyProjection", batch_size),
                        env,
                        f"latency-{k}",
                    )
                # Warm-up: every worker is connected, has set up and applied something.
                lo, hi, n, _, _ = pace(conn, 200, 1.0, seed=0)
                deadline = time.monotonic() + 90
                while True:
                    children.check_alive()
                    try:
                        wait_applied(conn, lo, hi, n, timeout=1)
                        break
                    except TimeoutError:
                        if time.monotonic() > deadline:
                            raise
                listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
                appender = conn.info.backend_pid
                busy = [c.pid for c in children.running()] + backend_pids(
                    conn, f"projectionist:{PROJECTION}:"
                )
                for rate in rates:
                    for rep in range(reps):
                        list(listener.notifies(timeout=0.05))  # whatever came before this run
                        cpu_before = cpu_seconds(busy) if busy else None
                        lo, hi, n, elapsed, commits = pace(conn, rate, seconds, seed=int(rate) * 10 + rep)
                        cpu_after = cpu_seconds(busy) if busy else None
                        wait_applied(conn, lo, hi, n)
                        children.check_alive()
                        notified = sum(1 for x in listener.notifies(timeout=0.2) if x.pid == appender)
                        workers_cpu = (
                            cpu_after - cpu_before
                            if cpu_before is not None and cpu_after is not None
                            else None
                        )
                        values = sorted(float(r[0]) for r in conn.execute(query, (lo, hi)))
                        dup = conn.execute(
                            "SELECT count(*) - count(DISTINCT global_position) FROM bench_applied "
                            "WHERE global_position BETWEEN %s AND %s",
                            (lo, hi),
                        ).fetchone()
                        if dup and dup[0]:
                            results.notes.append(f"latency run at {rate:g}/s: {dup[0]} events applied twice")
                        run = LatencyRun(
                            target_rate=rate,
                            achieved_rate=n / elapsed,
                            samples=len(values),
                            p50=percentile(values, 0.50),
                            p95=percentile(values, 0.95),
                            p99=percentile(values, 0.99),
                            max=values[-1] if values else math.nan,
                            notified=notified,
                            appends=commits,
                            workers_cpu=workers_cpu,
                            seconds=elapsed,
                        )
                        results.latency.setdefault(rate, []).append(run)
                        log(
                            f"  rep {rep + 1}: {rate:>6,.0f}/s (achieved {run.achieved_rate:,.0f}): "
                            f"p50 {run.p50 * 1000:.1f} ms, p95 {run.p95 * 1000:.1f} ms, "
                            f"p99 {run.p99 * 1000:.1f} ms, max {run.max * 1000:.1f} ms; "
                            f"{notified} of {commits} appends notified"
                        )
    except Exception as e:
        log(f"  latency failed: {one_line(e)}")
        results.latency.clear()
        results.latency_reason = f"error: {one_line(e)}"
        failures.fatal.append(f"latency: {one_line(e)}")
