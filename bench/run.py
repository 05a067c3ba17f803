"""Orchestrates a benchmark run: server, contestants, the five workloads, the report.

``make bench`` runs ``python -m bench``; ``make bench-quick`` adds ``--quick``
(small sizes, 1 repetition, no thresholds: it exits 0 unless the benchmark
itself breaks). A peer that cannot be installed is reported as "not measured"
with the reason; it never stops the run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.contestants import Contestant, Unavailable
from bench.data import batched_plan, concurrent_plan, payload_size
from bench.results import Results, render
from bench.server import BenchServer
from bench.throughput import Failures, batched_append, catch_up, concurrent_append, one_line, telemetry_cost
from projectionist.testing.reports import add_output_flags, publish

#: The published report's name in docs/results/ (``--publish``): what the performance page shows.
PUBLISHED_NAME = "benchmark.md"


@dataclass(frozen=True)
class Sizes:
    append_events: int
    warmup_events: int
    concurrent_events: int
    concurrent_warmup: int
    threads: int
    batch_size: int
    partition_counts: tuple[int, ...]
    latency_rates: tuple[float, ...]
    latency_seconds: float
    reps: int


FULL = Sizes(
    append_events=100_000,
    warmup_events=10_000,
    concurrent_events=4_000,
    concurrent_warmup=800,
    threads=8,
    batch_size=500,
    partition_counts=(1, 2, 4),
    latency_rates=(200.0, 500.0, 2000.0),
    latency_seconds=5.0,
    reps=3,
)
QUICK = Sizes(
    append_events=5_000,
    warmup_events=1_000,
    concurrent_events=800,
    concurrent_warmup=160,
    threads=8,
    batch_size=500,
    partition_counts=(1, 2, 4),
    latency_rates=(200.0, 500.0, 2000.0),
    latency_seconds=1.5,
    reps=1,
)

ALL_WORKLOADS = ("append", "concurrent", "server", "catchup", "telemetry", "partitioned", "latency")


def log(message: str) -> None:
    print(message, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="small sizes, 1 repetition (the CI smoke test)")
    p.add_argument("--reps", type=int, help="timed repetitions per measurement (default 3, quick 1)")
    p.add_argument("--events", type=int, help="events for workloads 1, 3 and 4 (default 100000)")
    p.add_argument(
        "--only",
        default=",".join(ALL_WORKLOADS),
        help=f"comma-separated subset of {','.join(ALL_WORKLOADS)} (catch-up needs append's data)",
    )
    p.add_argument("--no-peers", action="store_true", help="skip eventsourcing and Message DB")
    p.add_argument(
        "--exact-versions",
        action="store_true",
        help="also run projectionist appends with exact expected versions",
    )
    p.add_argument(
        "--notify-per-append",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run workload 2 with notify=True, a NOTIFY in every append transaction (default: on)",
    )
    add_output_flags(p, "bench")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base = QUICK if args.quick else FULL
    sizes = Sizes(
        **{
            **base.__dict__,
            "reps": args.reps or base.reps,
            "append_events": args.events or base.append_events,
        }
    )
    only = {w.strip() for w in args.only.split(",") if w.strip()}
    if only & {"catchup", "telemetry", "partitioned"}:
        only.add("append")  # they read what workload 1 wrote
    started = time.monotonic()
    now = dt.datetime.now(dt.UTC).astimezone()
    url = os.environ.get("BENCH_DATABASE_URL") or None
    log(
        f"projectionist bench ({'quick' if args.quick else 'full'}): "
        f"{'BENCH_DATABASE_URL' if url else 'starting embedded PostgreSQL'}"
    )
    failures = Failures(log)
    with BenchServer(url) as server:
        machine = server.machine()
        results = Results(
            quick=args.quick,
            sizes={
                "append/catch-up events": sizes.append_events,
                "concurrent events": sizes.concurrent_events,
                "threads": sizes.threads,
                "batch size": sizes.batch_size,
                "payload bytes": payload_size(),
            },
            reps=sizes.reps,
            cores=machine.cores,
        )
        results.header = [f"Date: {now:%Y-%m-%d %H:%M %Z}", *machine.describe()]
        contestants, unavailable = build_contestants(server, args)
        for key, reason in unavailable.items():
            for workload in ("batched_append", "concurrent_append", "catch_up_noop", "catch_up_read_model"):
                results.cell(workload, key).reason = reason
        run_workloads(server, contestants, unavailable, sizes, only, results, failures)
        for c in contestants:
            try:
                c.close()
            except Exception as e:
                log(f"closing {c.label}: {one_line(e)}")
        load_after = os.getloadavg()
        results.header.append(
            "Load average when the run ended: "
            + ", ".join(f"{x:.2f}" for x in load_after)
            + (
                " (busy machine: treat the numbers as noisy)"
                if machine.load_before[0] > 0.5 * machine.cores
                else ""
            )
        )
    elapsed = time.monotonic() - started
    results.header.append(f"Run time: {elapsed:.0f} s")
    report = render(results)
    print()
    print(report)
    latest = write_report(report, args.out, quick=args.quick, started_at=now)
    if args.publish and not args.quick:
        # The documentation's performance page shows this file.
        published = args.out / PUBLISHED_NAME
        published.write_text(latest.read_text())
        log(f"published: {', '.join(map(str, publish([published])))}")
    if failures.fatal:
        print("\nthe benchmark itself failed:", file=sys.stderr)
        for f in failures.fatal:
            print(f"  {f}", file=sys.stderr)
        return 1
    return 0


def write_report(report: str, out: Path, *, quick: bool, started_at: dt.datetime) -> Path:
    """The report as ``latest.md`` (``quick-latest.md`` for a smoke run) and, for a full run, as
    ``<date>-<HHMM>.md`` too; returns the latest.

    Runs on a noisy machine are read together (``python -m bench.spread``),
    so a second run the same day must not overwrite the first.
    """
    out.mkdir(parents=True, exist_ok=True)
    latest = out / ("quick-latest.md" if quick else "latest.md")
    written = [latest] if quick else [out / f"{started_at:%Y-%m-%d-%H%M}.md", latest]
    for path in written:
        path.write_text(report + "\n")
    log(f"\nwrote {' and '.join(map(str, written))}")
    return latest


def build_contestants(
    server: BenchServer, args: argparse.Namespace
) -> tuple[list[Contestant], dict[str, str]]:
    from bench.ours import Projectionist
    from bench.raw import Raw, RawCopy, RawUnnest

    contestants: list[Contestant] = []
    unavailable: dict[str, str] = {}
    contestants.append(Raw(server.fresh_database("bench_raw")))
    contestants.append(RawUnnest(server.fresh_database("bench_raw_unnest")))
    contestants.append(RawCopy(server.fresh_database("bench_raw_copy")))
    ours_url = server.fresh_database("bench_projectionist")
    contestants.append(Projectionist(ours_url))
    if args.exact_versions:
        contestants.append(
            Projectionist(server.fresh_database("bench_projectionist_exact"), exact_versions=True)
        )
    if args.notify_per_append:
        contestants.append(
            Projectionist(server.fresh_database("bench_projectionist_notify"), notify_per_append=True)
        )
    if args.no_peers:
        unavailable["eventsourcing"] = unavailable["messagedb"] = "skipped (--no-peers)"
    else:
        for key, factory in (("eventsourcing", _eventsourcing), ("messagedb", _messagedb)):
            try:
                contestants.append(factory(server))
            except Unavailable as e:
                unavailable[key] = str(e)
                log(f"{key}: not measured: {e}")
            except Exception as e:
                unavailable[key] = f"setup failed: {one_line(e)}"
                log(f"{key}: not measured: setup failed: {one_line(e)}")
    for c in list(contestants):
        if c.key in unavailable:
            continue
        try:
            c.setup()
        except Unavailable as e:
            unavailable[c.key] = str(e)
            contestants.remove(c)
            log(f"{c.key}: not measured: {e}")
        except Exception as e:
            if c.key in ("raw", "raw_unnest", "raw_copy", "projectionist"):
                raise
            unavailable[c.key] = f"setup failed: {one_line(e)}"
            contestants.remove(c)
            log(f"{c.key}: not measured: setup failed: {one_line(e)}")
    return contestants, unavailable


def _eventsourcing(server: BenchServer) -> Contestant:
    from bench.es import EventSourcing

    return EventSourcing(server.fresh_database("bench_es"))


def _messagedb(server: BenchServer) -> Contestant:
    from bench.mdb import MessageDB

    return MessageDB(server.fresh_database("bench_mdb"), "bench_mdb")


def run_workloads(
    server: BenchServer,
    contestants: list[Contestant],
    unavailable: dict[str, str],
    sizes: Sizes,
    only: set[str],
    results: Results,
    failures: Failures,
) -> None:
    by_key = {c.key: c for c in contestants}
    # Concurrent appends, catch-up, the telemetry pairs and the partitioned
    # catch-ups take a second or less a repetition, and a hiccup of the host
    # shifts one repetition by 20-40% on a busy 2-core VM (the repetitions'
    # spread in the report shows it). They are cheap to repeat, so when
    # repeating at all they take three times as many repetitions as the other
    # workloads: the median then holds against up to four outliers a side
    # instead of two.
    short_reps = 3 * sizes.reps if sizes.reps > 1 else sizes.reps
    if short_reps != sizes.reps and only & {"concurrent", "server", "catchup", "telemetry", "partitioned"}:
        results.notes.append(
            "concurrent appends (both views), catch-up, the telemetry pairs and partitioned catch-up: "
            f"median of {short_reps} repetitions (short runs, the noisiest)"
        )
    # Raw's other batch methods take part in workload 1 only, notify=True in workload 2 only.
    raw_methods_only = ("raw_unnest", "raw_copy")
    if "concurrent" in only:
        plan = concurrent_plan(sizes.concurrent_events, sizes.threads)
        warmup = concurrent_plan(sizes.concurrent_warmup, sizes.threads, seed=3)
        writers = [c for c in contestants if c.key not in raw_methods_only]
        concurrent_append(writers, plan, warmup, short_reps, results, failures, log)
    if "server" in only:
        from bench.server_only import server_only

        try:
            server_only(
                server.fresh_database("bench_server_only"),
                clients=sizes.threads,
                events=sizes.concurrent_events,
                warmup_events=sizes.concurrent_warmup,
                reps=short_reps,
                results=results,
                log=log,
            )
        except Exception as e:
            # The same SQL as workload 2's: if it breaks here, the bench is broken.
            failures.fatal.append(f"server-only appends: {one_line(e)}")
            log(f"  server-only appends failed: {one_line(e)}")
            for cell in results.server_only.values():
                cell.reason = f"error: {one_line(e)}"
                cell.samples.clear()
    readers = [
        c
        for c in contestants
        if c.key not in (*raw_methods_only, "projectionist_exact", "projectionist_notify")
    ]
    if "append" in only:
        plan_b = batched_plan(sizes.append_events)
        warm_b = batched_plan(sizes.warmup_events, seed=4)
        loaders = [c for c in contestants if c.key != "projectionist_notify"]
        batched_append(loaders, plan_b, warm_b, sizes.reps, results, failures, log)
        for c in readers:
            try:
                c.vacuum_analyze()
            except Exception as e:
                log(f"  {c.label}: VACUUM ANALYZE failed: {one_line(e)}")
        # Flush what the loads (and the VACUUMs) dirtied now, so no timed
        # catch-up shares the disk and the cores with the checkpointer
        # writing out another contestant's pages.
        try:
            with server.admin() as conn:
                conn.execute("CHECKPOINT")
        except Exception as e:
            log(f"  CHECKPOINT after loading failed: {one_line(e)}")
    if "catchup" in only:
        catch_up(readers, sizes.batch_size, short_reps, results, failures, log)
    if "telemetry" in only and "projectionist" in by_key:
        # A difference of a few percent: as many pairs as the short workloads get.
        telemetry_cost(by_key["projectionist"], sizes.batch_size, short_reps, results, failures, log)
    if "partitioned" in only and "projectionist" in by_key:
        from bench.partitioned import partitioned

        mdb = by_key.get("messagedb")
        partitioned(
            ours_url=by_key["projectionist"].url,
            ours_db="bench_projectionist",
            ours_events=by_key["projectionist"].count(),
            mdb_url=mdb.url if mdb else None,
            mdb_db="bench_mdb",
            mdb_unavailable=unavailable.get("messagedb") or (None if mdb else "not set up"),
            counts=sizes.partition_counts,
            batch_size=sizes.batch_size,
            reps=short_reps,
            pg_stat_statements=server.has_pg_stat_statements(),
            local_server=server.embedded,
            results=results,
            failures=failures,
            log=log,
        )
    if "latency" in only:
        from bench.latency import latency
        from projectionist.store.connection import connect
        from projectionist.store.schema import migrate

        latency_url = server.fresh_database("bench_latency")
        with connect(latency_url, autocommit=True) as conn:
            migrate(conn)
        with tempfile.TemporaryDirectory(prefix="projectionist-bench-latency-") as tmp:
            latency(
                url=latency_url,
                rates=sizes.latency_rates,
                seconds=sizes.latency_seconds,
                reps=sizes.reps,
                batch_size=sizes.batch_size,
                log_dir=Path(tmp),
                results=results,
                failures=failures,
                log=log,
                local_server=server.embedded,
            )
    else:
        results.latency_reason = "skipped (--only)"
