"""Workload 4: partitioned catch-up with N = 1, 2, 4 worker processes, and a Message DB consumer group.

**What is timed.** From the moment all N processes are connected and waiting
at the start gate (so interpreter start-up and imports are excluded, for both
contestants) until the last event is applied: for projectionist, until the sum
of the N checkpoints' ``events_processed`` reaches the store's event count
(polled every 5 ms); for Message DB, until the last member's final, empty read.

**Rows fetched** are counted by the server, not by the clients:
``pg_stat_statements.rows`` of the read statement (projectionist's gap-safe
read; Message DB's top-level ``get_category_messages`` call) is the number of
rows the server sent back, whatever the client then did with them. It is the
most honest count: a client-side counter could only count what the client
chose to count. projectionist's read returns one extra marker row per read
(the newest visible row, where an idle partition's checkpoint may move), so the
ratio is a little above 1.0.

**Rows the server read** (from ``pg_stat_user_tables``: heap tuples fetched by
index scans plus sequential-scan tuples) shows the other side. projectionist's
workers read through their partition indexes (``projectionist partition-index
create``, built once before the runs, as a deployment of N workers would), so
each visits only its own rows. Message DB's consumer-group filter walks every
message of the category for each member and sends only the member's own.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
from psycopg import sql

from bench.procs import GATE_KEY, Children, Gate, backend_pids, bench_env, cpu_seconds, worker_args
from bench.results import PartitionedCell, PartitionedRun, Results
from bench.throughput import Failures, one_line
from projectionist.testing import python_module

Log = Callable[[str], None]

#: The shares of the events applied between which the steady-state CPU cost is read.
STEADY_STATE = (0.1, 0.9)

# Which statements count as "the read", per contestant (matched against pg_stat_statements.query).
OUR_READ = r"\mfrom\s+events\M"
MDB_READ = r"get_category_messages"


class StatementStats:
    """pg_stat_statements for one database, switched on only while this workload runs."""

    def __init__(self, url: str, dbname: str, available: bool) -> None:
        self.url = url
        self.dbname = dbname
        self.available = available

    def __enter__(self) -> StatementStats:
        if self.available:
            with psycopg.connect(self.url, autocommit=True) as conn:
                conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
                conn.execute(
                    sql.SQL("ALTER DATABASE {} SET pg_stat_statements.track = 'top'").format(
                        sql.Identifier(self.dbname)
                    )
                )
        return self

    def __exit__(self, *exc: object) -> None:
        if self.available:
            with psycopg.connect(self.url, autocommit=True) as conn:
                conn.execute(
                    sql.SQL("ALTER DATABASE {} RESET pg_stat_statements.track").format(
                        sql.Identifier(self.dbname)
                    )
                )

    def reset(self) -> None:
        if self.available:
            with psycopg.connect(self.url, autocommit=True) as conn:
                conn.execute("SELECT pg_stat_statements_reset()")

    def rows(self, pattern: str) -> tuple[int | None, int | None]:
        """(rows returned, calls) of the statements matching ``pattern`` since the reset."""
        if not self.available:
            return None, None
        with psycopg.connect(self.url, autocommit=True) as conn:
            row = conn.execute(
                "SELECT coalesce(sum(rows), 0), coalesce(sum(calls), 0) FROM pg_stat_statements "
                "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) "
                "AND query ~* %s AND query !~* '^\\s*(insert|update|delete)'",
                (pattern,),
            ).fetchone()
        assert row is not None
        return int(row[0]), int(row[1])


def server_rows_read(url: str, table: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        row = conn.execute(
            "SELECT coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0) FROM pg_stat_user_tables "
            "WHERE relid = %s::regclass",
            (table,),
        ).fetchone()
    return int(row[0]) if row else 0


def _settle_stats() -> None:
    # Exiting backends flush their statistics; give the last ones a moment.
    time.sleep(0.3)


def run_ours(
    url: str,
    n: int,
    name: str,
    expected: int,
    batch_size: int,
    stats: StatementStats,
    log_dir: Path,
    *,
    local_server: bool = False,
) -> PartitionedRun:
    stats.reset()
    before = server_rows_read(url, "events")
    gate = Gate(url)
    try:
        with Children(log_dir) as children:
            env = bench_env(url, BENCH_GATE_KEY=str(GATE_KEY), BENCH_PROJECTION_NAME=name)
            for k in range(n):
                children.spawn(
                    worker_args(k, n, "bench.projections:NoopProjection", batch_size), env, f"{name}-{k}"
                )
            gate.wait_for(f"projectionist:{name}:", n, children)
            with psycopg.connect(url, autocommit=True) as conn:
                # Backend process ids name local processes only when the server
                # is local; without the backends' share there is nothing to report.
                busy = (
                    [proc.pid for proc in children.running()] + backend_pids(conn, f"projectionist:{name}:")
                    if local_server
                    else []
                )
                cpu_before = cpu_seconds(busy) if busy else None
                # The steady state: CPU time between 10% and 90% of the events
                # applied, leaving out each worker's start (a fresh backend fills
                # its catalog caches and plans the read its first times) and
                # the tail where the last worker finishes alone.
                marks: dict[float, tuple[int, float | None]] = {}
                started = gate.open()
                deadline = time.monotonic() + 600
                while True:
                    row = conn.execute(
                        "SELECT coalesce(sum(events_processed), 0) FROM projection_checkpoints "
                        "WHERE projection_name = %s AND total_workers = %s",
                        (name, n),
                    ).fetchone()
                    done = int(row[0]) if row else 0
                    for share in STEADY_STATE:
                        if share not in marks and done >= share * expected:
                            marks[share] = (done, cpu_seconds(busy) if busy else None)
                    if done >= expected:
                        finished = time.time()
                        cpu_after = cpu_seconds(busy) if busy else None
                        break
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{done} of {expected} events applied after 600 s")
                    children.check_alive()
                    time.sleep(0.005)
    finally:
        gate.close()
    _settle_stats()
    rows, calls = stats.rows(OUR_READ)
    cpu = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
    (first, cpu_first), (last, cpu_last) = marks[STEADY_STATE[0]], marks[STEADY_STATE[1]]
    steady = (
        None
        if cpu_first is None or cpu_last is None or last <= first
        else (last - first, cpu_last - cpu_first)
    )
    return PartitionedRun(
        finished - started, done, rows, calls, server_rows_read(url, "events") - before, cpu, steady
    )


def run_mdb(
    url: str, n: int, name: str, batch_size: int, stats: StatementStats, log_dir: Path
) -> PartitionedRun:
    stats.reset()
    before = server_rows_read(url, "message_store.messages")
    gate = Gate(url)
    try:
        with Children(log_dir) as children:
            env = bench_env(url)
            procs = [
                children.spawn(
                    python_module(
                        "bench.member", url, str(k), str(n), str(batch_size), str(GATE_KEY), f"{name}:{k}"
                    ),
                    env,
                    f"{name}-{k}",
                )
                for k in range(n)
            ]
            gate.wait_for(f"{name}:", n, children)
            started = gate.open()
            reports = []
            for proc in procs:
                code = proc.wait(600)
                if code != 0:
                    raise RuntimeError(f"member exited with {code}: {proc.output(300)}")
                reports.append(json.loads(proc.last_line()))
    finally:
        gate.close()
    _settle_stats()
    rows, calls = stats.rows(MDB_READ)
    events = sum(int(r["events"]) for r in reports)
    finished = max(float(r["finished"]) for r in reports)
    return PartitionedRun(
        finished - started, events, rows, calls, server_rows_read(url, "message_store.messages") - before
    )


def build_partition_indexes(url: str, counts: list[int], results: Results, log: Log) -> None:
    """What ``projectionist partition-index create --total-workers N`` does, for each N; not timed."""
    from projectionist.consume import partition_indexes

    took = []
    with psycopg.connect(url, autocommit=True) as conn:
        for n in counts:
            started = time.perf_counter()
            partition_indexes.create_indexes(conn, n)
            took.append(f"N={n} in {time.perf_counter() - started:.1f} s")
        # Flush what the builds dirtied now, not during a timed run.
        with contextlib.suppress(psycopg.Error):
            conn.execute("CHECKPOINT")
    if took:
        log(f"  projectionist partition indexes built: {', '.join(took)}")
        results.notes.append(
            "partitioned catch-up: projectionist's workers read through their partition indexes "
            "(`projectionist partition-index create`, built before the runs and not timed: "
            f"{', '.join(took)})"
        )


def partitioned(
    *,
    ours_url: str,
    ours_db: str,
    ours_events: int,
    mdb_url: str | None,
    mdb_db: str,
    mdb_unavailable: str | None,
    counts: tuple[int, ...],
    batch_size: int,
    reps: int,
    pg_stat_statements: bool,
    local_server: bool,
    results: Results,
    failures: Failures,
    log: Log,
) -> None:
    log(
        f"4. partitioned catch-up: N = {', '.join(map(str, counts))} worker processes, {ours_events:,} events"
    )
    if not pg_stat_statements:
        results.notes.append("rows fetched not measured: the server was not started with pg_stat_statements")
    with tempfile.TemporaryDirectory(prefix="projectionist-bench-logs-") as tmp:
        log_dir = Path(tmp)
        contestants: list[tuple[str, Callable[[int, str], PartitionedRun]]] = []
        stack = contextlib.ExitStack()
        ours_stats = stack.enter_context(StatementStats(ours_url, ours_db, pg_stat_statements))
        contestants.append(
            (
                "projectionist",
                lambda n, name: run_ours(
                    ours_url, n, name, ours_events, batch_size, ours_stats, log_dir, local_server=local_server
                ),
            )
        )
        if mdb_url is not None and mdb_unavailable is None:
            mdb_stats = stack.enter_context(StatementStats(mdb_url, mdb_db, pg_stat_statements))
            contestants.append(
                ("messagedb", lambda n, name: run_mdb(mdb_url, n, name, batch_size, mdb_stats, log_dir))
            )
        else:
            for n in counts:
                results.partitioned[("messagedb", n)] = PartitionedCell(
                    reason=mdb_unavailable or "not set up"
                )
        with stack:
            build_partition_indexes(ours_url, [n for n in counts if n > 1], results, log)
            for key, run in contestants:
                try:
                    run(2, f"bench_part_{key}_warmup")  # warm-up, untimed
                except Exception as e:
                    log(f"  {key}: warm-up failed: {one_line(e)}")
                    for n in counts:
                        results.partitioned[(key, n)] = PartitionedCell(reason=f"error: {one_line(e)}")
                    if key == "projectionist":
                        failures.fatal.append(f"partitioned warm-up: {one_line(e)}")
            for rep in range(reps):
                for n in counts:
                    for key, run in contestants:
                        cell = results.partitioned.setdefault((key, n), PartitionedCell())
                        if cell.reason:
                            continue
                        try:
                            r = run(n, f"bench_part_{key}_n{n}_r{rep}")
                            cell.runs.append(r)
                            fetched = "?" if r.rows_fetched is None else f"{r.rows_fetched:,}"
                            log(
                                f"  rep {rep + 1}: {key:<14} N={n}: {r.wall_seconds:6.2f} s, "
                                f"{r.events / r.wall_seconds:>9,.0f} events/s, rows fetched {fetched}"
                            )
                        except Exception as e:
                            log(f"  {key} N={n}: failed: {one_line(e)}")
                            cell.reason = f"error: {one_line(e)}"
                            cell.runs.clear()
                            if key == "projectionist":
                                failures.fatal.append(f"partitioned N={n}: {one_line(e)}")
