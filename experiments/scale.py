"""``make scale-experiment``: add workers under a steady append load, then remove them; measure; verify.

The seed's steps (1 -> 2 -> 3 -> 4 workers, then scale down) as real
processes: the append API, a headless Locust offering a constant rate, and
``projectionist worker --worker-id K --total-workers 4`` subprocesses, on a
dedicated ``projectionist_scale`` database of the embedded server (or of
``DATABASE_URL``'s server). Every ``--sample-interval`` seconds it records
the store head, each partition's progress and lag, and CPU use per role.
Workers are added and removed under a fixed count of 4 partitions. Then
(unless ``--rescale-to 0``) the group is stopped and switched to M partitions
with ``projectionist rescale``, and M workers run under the same load. At the
end it stops the load, lets every partition drain, and verifies the sample
read model: every event applied exactly once, in order, each aggregate by one
worker (after a rescale: only by its owner under 4 and under M partitions).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import signal
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from experiments import report
from experiments.load import LOCUSTFILES, SHAPES
from experiments.report import Phase, Sample
from experiments.sampling import CpuTracker, postmaster_pid, sample_store, system_cpu_seconds
from experiments.verify import verify_rescaled
from projectionist.consume.partition_indexes import create_indexes
from projectionist.demo.sample_projection import ScalableProjection
from projectionist.demo.verify import Verification, format_verification, verify
from projectionist.errors import ProjectionistError
from projectionist.settings import Settings
from projectionist.store.connection import connect, database_url
from projectionist.store.schema import migrate
from projectionist.testing import (
    ChildProcess,
    HarnessError,
    PostgresServer,
    child_env,
    free_port,
    projectionist_command,
    python_module,
    start_api,
    wait_for_http,
)
from projectionist.testing.reports import OUT, add_output_flags, publish

SCALE_DATABASE = "projectionist_scale"
TOTAL_WORKERS = 4


@dataclass(frozen=True, slots=True)
class Options:
    step_seconds: float
    max_workers: int
    remove: bool
    rescale_to: int
    rate: float
    batch_size: int
    users: int
    keys: int
    distribution: str
    zipf_s: float
    sample_interval: float
    catch_up_seconds: float
    drain_timeout: float
    out: Path
    scratch: Path
    locust_dir: Path
    database: str
    name: str


def plan(max_workers: int, remove: bool, rescale_to: int = 0) -> list[Phase]:
    """1, 2, ... ``max_workers`` workers; then (if ``remove``) back down to 1; then (if
    ``rescale_to``) a change to that many partitions, one worker each; then a drain with all."""
    phases = [
        Phase(f"{n} worker{'s' if n > 1 else ''}", tuple(range(n)), added=n - 1)
        for n in range(1, max_workers + 1)
    ]
    if remove:
        phases += [
            Phase(f"{n} worker{'s' if n > 1 else ''} (w{n} stopped)", tuple(range(n)), removed=n)
            for n in range(max_workers - 1, 0, -1)
        ]
    total = TOTAL_WORKERS
    if rescale_to and rescale_to != TOTAL_WORKERS:
        total = rescale_to
        phases.append(
            Phase(
                f"rescaled to {total} partitions, {total} worker{'s' if total > 1 else ''}",
                tuple(range(total)),
                total=total,
                rescale=True,
            )
        )
    phases.append(Phase("drain (no load)", tuple(range(total)), load=False, total=total))
    return phases


class Experiment:
    def __init__(self, options: Options) -> None:
        self.o = options
        self.phases = plan(options.max_workers, options.remove, options.rescale_to)
        self.total = TOTAL_WORKERS
        self.samples: list[Sample] = []
        self.starts: list[float] = []
        self.workers: dict[int, ChildProcess] = {}
        self.retired: list[ChildProcess] = []
        self.api: ChildProcess | None = None
        self.locust: ChildProcess | None = None
        #: Why Locust judged the load run a failure (too many failed appends), or None.
        self.load_failed: str | None = None
        self.loading = False
        self.t0 = 0.0
        self.end = 0.0

    # -- processes -------------------------------------------------------

    def _start_worker(self, worker_id: int) -> None:
        log = self.o.scratch / f"worker-{worker_id}-{len(self.retired) + len(self.workers)}.log"
        argv = projectionist_command(
            "worker", "--worker-id", str(worker_id), "--total-workers", str(self.total),
            "--no-migrate", "--log-level", "WARNING",
        )  # fmt: skip
        self.workers[worker_id] = ChildProcess(
            f"worker-{worker_id}", argv, env=child_env({"DATABASE_URL": self.url}), log_path=log
        )

    def _stop_worker(self, worker_id: int) -> None:
        child = self.workers.pop(worker_id)
        code = child.stop()
        self.retired.append(child)
        if code != 0:
            raise HarnessError(f"worker {worker_id} exited with {code} on SIGTERM:\n{child.output()}")

    def _start_locust(self, host: str) -> ChildProcess:
        files = ",".join(str(self.o.locust_dir / f) for f in (LOCUSTFILES["http"], SHAPES["constant"]))
        env = child_env(
            {
                "LOAD_DURATION": "0",  # until we stop it
                "LOAD_USERS": str(self.o.users),
                "LOAD_RATE": str(self.o.rate / self.o.batch_size),
                "LOAD_BATCH_SIZE": str(self.o.batch_size),
                "LOAD_KEYS": str(self.o.keys),
                "LOAD_DISTRIBUTION": self.o.distribution,
                "LOAD_ZIPF_S": str(self.o.zipf_s),
                "LOAD_METRICS_PORT": "0",
                "LOAD_MAX_P95_MS": "60000",
            }
        )
        prefix = str(self.o.scratch / "locust")
        argv = python_module(
            "locust", "-f", files, "--headless", "--host", host, "--csv", prefix, "--html", f"{prefix}.html",
            "--json-file", prefix, "--stop-timeout", "10", "--loglevel", "WARNING",
        )  # fmt: skip
        return ChildProcess("locust", argv, env=env, log_path=self.o.scratch / "locust.log")

    def _check_children(self) -> None:
        load = [self.locust] if self.locust is not None and self.loading else []
        for child in [c for c in (self.api, *load) if c is not None] + list(self.workers.values()):
            if not child.alive():
                raise HarnessError(f"{child.name} died with {child.returncode}:\n{child.output()}")

    def _pids(self) -> dict[str, list[int]]:
        return {
            "api": [self.api.pid] if self.api else [],
            "locust": [self.locust.pid] if self.locust else [],
            "workers": [c.pid for c in [*self.retired, *self.workers.values()]],
            "sampler": [os.getpid()],
        }

    # -- sampling ----------------------------------------------------------

    def _sample(self, phase: int) -> Sample:
        store = sample_store(self.conn, self.total)
        busy, total = system_cpu_seconds()
        sample = Sample(
            t=time.monotonic() - self.t0,
            phase=phase,
            running=tuple(sorted(self.workers)),
            store=store,
            cpu_busy=busy,
            cpu_total=total,
            cpu_roles=self.cpu.read(self._pids()),
        )
        self.samples.append(sample)
        return sample

    def _run_phase(self, index: int, until: float | None) -> Sample:
        """Sample until ``until`` (monotonic), or for a drain until every partition has caught up."""
        next_at = time.monotonic()
        last_print = 0.0
        taken = 0
        while True:
            self._check_children()
            sample = self._sample(index)
            taken += 1
            now = time.monotonic()
            if now - last_print >= 5:
                last_print = now
                lags = " ".join(f"{p.lag_events:>6}" for p in sample.store.partitions)
                print(
                    f"  t={sample.t:6.1f}s head={sample.store.head:>8} lag per partition: {lags}",
                    file=sys.stderr,
                )
            if until is not None and now >= until:
                return sample
            # Two samples at least, so even an instant drain has a rate to report.
            if until is None and sample.store.lag_events == 0 and taken >= 2:
                return sample
            if until is None and now - self.starts[index] - self.t0 > self.o.drain_timeout:
                raise HarnessError(
                    f"the workers did not catch up within {self.o.drain_timeout:.0f}s of the drain"
                )
            next_at += self.o.sample_interval
            time.sleep(max(0.0, next_at - time.monotonic()))

    # -- the run -----------------------------------------------------------

    def run(self) -> Verification:
        o = self.o
        o.scratch.mkdir(parents=True, exist_ok=True)
        o.out.mkdir(parents=True, exist_ok=True)
        self.url = PostgresServer(database_url(Settings.from_env())).create_database(o.database)
        with connect(self.url, autocommit=True) as conn:
            migrate(conn)
            # As the compose stack's `migrate --partition-indexes 4` does: built
            # on the empty table, used once autovacuum has analyzed it.
            create_indexes(conn, TOTAL_WORKERS)
        self.conn = connect(self.url, autocommit=True, application_name="scale-experiment")
        self.cpu = CpuTracker(postmaster_pid(self.conn))
        try:
            port = free_port()
            self.api = start_api(self.url, port, o.scratch / "api.log")
            host = f"http://127.0.0.1:{port}"
            wait_for_http(f"{host}/readyz", self.api)
            print(f"API on {host}; starting Locust at {o.rate:,.0f} events/s", file=sys.stderr)
            self.locust = self._start_locust(host)
            self.loading = True
            self._wait_for_first_events()
            self.t0 = time.monotonic()
            for index, phase in enumerate(self.phases):
                self.starts.append(time.monotonic() - self.t0)
                print(f"phase {index + 1}/{len(self.phases)}: {phase.name}", file=sys.stderr)
                if not phase.load and self.loading:
                    self._stop_locust()
                if phase.removed is not None:
                    self._stop_worker(phase.removed)
                if phase.rescale:
                    self._rescale(phase.total)
                for worker_id in phase.workers:
                    if worker_id not in self.workers:
                        self._start_worker(worker_id)
                until = time.monotonic() + o.step_seconds if phase.load else None
                self._run_phase(index, until)
            self.end = time.monotonic() - self.t0
            for worker_id in sorted(self.workers):
                self._stop_worker(worker_id)
            if self.total != TOTAL_WORKERS:
                return verify_rescaled(self.conn, TOTAL_WORKERS, self.total)
            return verify(self.conn, TOTAL_WORKERS)
        finally:
            self._cleanup()

    def _rescale(self, total: int) -> None:
        """Stop the old group, switch the partition count with ``projectionist rescale``."""
        for worker_id in sorted(self.workers):
            self._stop_worker(worker_id)
        argv = projectionist_command(
            "rescale", "--projection", ScalableProjection.name,
            "--total-workers", str(total), "--timeout", "60",
        )  # fmt: skip
        child = ChildProcess(
            "rescale",
            argv,
            env=child_env({"DATABASE_URL": self.url}),
            log_path=self.o.scratch / "rescale.log",
        )
        code = child.wait(90)
        if code != 0:
            child.stop()
            raise HarnessError(f"projectionist rescale exited with {code}:\n{child.output()}")
        print(f"  {child.output(300)}", file=sys.stderr)
        if total > 1:
            # Step 2 of the README's "Changing the partition count".
            create_indexes(self.conn, total)
        self.total = total

    def _wait_for_first_events(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_children()
            row = self.conn.execute("SELECT count(*) FROM events").fetchone()
            if row and row[0]:
                return
            time.sleep(0.2)
        raise HarnessError(f"Locust appended nothing within {timeout:.0f}s")

    def _stop_locust(self) -> None:
        assert self.locust is not None
        self.loading = False
        # SIGINT: while a load shape runs, Locust has not installed its SIGTERM
        # handler yet, so SIGTERM would kill it without its final reports.
        code = self.locust.stop(timeout=30, signum=signal.SIGINT)
        # Locust exits 0 or 1 (thresholds); anything else means it crashed.
        if code not in (0, 1):
            raise HarnessError(f"Locust exited with {code}:\n{self.locust.output()}")
        if code == 1:
            # The rates measured are of a run whose appends partly failed:
            # still reported, with the verdict, but the run does not pass.
            self.load_failed = load_verdict(self.locust.output(20_000))

    def _cleanup(self) -> None:
        for child in list(self.workers.values()):
            child.stop()
        if self.locust is not None and self.locust.alive():
            self.locust.stop(signum=signal.SIGINT)
        if self.api is not None:
            self.api.stop()
        self.conn.close()


def load_verdict(locust_log: str) -> str:
    """The reason locust_setup.py logged for failing the run, or a pointer to the log."""
    marker = "thresholds exceeded: "
    found = [line.split(marker, 1)[1].strip() for line in locust_log.splitlines() if marker in line]
    return found[-1] if found else "Locust exited with 1; see its log"


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f", {kb / 1024 / 1024:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        memory = ""
    system = f"Linux {platform.release()}, Python {platform.python_version()}"
    return f"{os.cpu_count()} CPU cores ({cpu}){memory}, {system}"


def _observations(summaries: Sequence[report.PhaseSummary], offered: float) -> list[str]:
    """Facts read off the numbers, so a re-run's Markdown stays true to its own data."""
    notes = []
    loaded = [s for s in summaries if s.phase.load]
    if loaded:
        low = min(loaded, key=lambda s: s.append_rate)
        notes.append(
            f"Offered load {offered:,.0f} events/s; appended between {low.append_rate:,.0f} "
            f"({low.phase.name}) and {max(s.append_rate for s in loaded):,.0f} events/s per phase."
        )
        busiest = max(loaded, key=lambda s: s.cpu_busy)
        cores = ", ".join(f"{r} {busiest.cpu_cores.get(r, 0.0):.2f}" for r in report.CPU_COLUMNS)
        notes.append(
            f"CPU was busiest in '{busiest.phase.name}': {busiest.cpu_busy:.0%} of all cores "
            f"(cores used: {cores})."
        )
        other = statistics.fmean(s.cpu_cores.get("other", 0.0) for s in loaded)
        if other >= 0.25:
            notes.append(
                f"Other processes on the machine used {other:.2f} cores on average during the loaded "
                "phases: this run had less CPU than the machine has, so its absolute rates understate it."
            )
    for s in summaries:
        caught = (
            "did not catch up within the run" if s.catch_up is None else f"caught up in {s.catch_up:.1f} s"
        )
        if s.phase.added is not None:
            notes.append(f"Worker {s.phase.added}, started at t={s.start:.0f}s, {caught}.")
        elif s.phase.rescale:
            notes.append(
                f"After the switch to {s.phase.total} partitions at t={s.start:.0f}s, "
                f"every partition {caught}."
            )
    return notes


def write_outputs(exp: Experiment, verification: Verification, started_at: dt.datetime) -> Path:
    o = exp.o
    summaries = report.summarize(
        exp.samples, exp.phases, exp.starts, exp.end, max_lag_seconds=o.catch_up_seconds
    )
    report.write_samples_csv(exp.samples, exp.phases, o.out / f"{o.name}.csv")
    report.write_phases_csv(summaries, o.out / f"{o.name}-phases.csv")
    title = (
        f"{o.max_workers} workers added every {o.step_seconds:.0f}s under {o.rate:,.0f} events/s "
        f"({o.distribution} keys), {TOTAL_WORKERS} partitions"
        + (f", then rescaled to {o.rescale_to}" if o.rescale_to and o.rescale_to != TOTAL_WORKERS else "")
    )
    report.plot(exp.samples, exp.phases, exp.starts, o.out / f"{o.name}.png", title=title, target_rate=o.rate)
    with connect(exp.url) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    server_version = row[0] if row else "?"
    lines = [
        f"# Scaling experiment: {title}",
        "",
        f"Run {started_at:%Y-%m-%d %H:%M} UTC on {_machine()}; PostgreSQL {server_version} "
        f"(embedded unless DATABASE_URL was set), database `{o.database}`.",
        "",
        f"Load: Locust, {o.users} users offering {o.rate:,.0f} events/s "
        f"({o.rate / o.batch_size:,.0f} requests/s of {o.batch_size} events) through the API, "
        f"over {o.keys:,} aggregates ({o.distribution}). Phases of {o.step_seconds:.0f} s, sampled every "
        f"{o.sample_interval:g} s; 'catch-up' is the time until the added worker, having applied events, "
        f"lags by at most {o.catch_up_seconds:g} s (after the rescale: until every partition does). Lag is "
        "summed over all partitions, including those without a running worker.",
        "",
        *(
            [
                f"**The load run failed Locust's thresholds:** {exp.load_failed}. "
                "The rates below are of what was appended.",
                "",
            ]
            if exp.load_failed
            else []
        ),
        report.markdown_table(summaries),
        "",
        "CPU per role (cores; the machine has " + str(os.cpu_count()) + "):",
        "",
        report.cpu_table(summaries),
        "",
        f"![lag and per-worker rate over time]({o.name}.png)",
        "",
        "Observations (computed from this run's numbers):",
        "",
        *(f"- {note}" for note in _observations(summaries, o.rate)),
        "",
        "```text",
        *format_verification(verification),
        "```",
        "",
        f"Raw data: [`{o.name}.csv`]({o.name}.csv) (one row per sample), "
        f"[`{o.name}-phases.csv`]({o.name}-phases.csv) (the table above).",
        "",
    ]
    path = o.out / f"{o.name}.md"
    path.write_text("\n".join(lines))
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="make scale-experiment", description=__doc__)
    p.add_argument("--step-seconds", type=float, default=20.0, help="seconds per phase (default 20)")
    p.add_argument("--max-workers", type=int, default=TOTAL_WORKERS, choices=range(1, TOTAL_WORKERS + 1))
    p.add_argument("--no-remove", dest="remove", action="store_false", help="skip the scale-down phases")
    p.add_argument(
        "--rescale-to",
        type=int,
        default=2,
        help="after scaling down, change the partition count to this with `projectionist rescale` "
        "and run one worker per partition (default 2; 0 or 4: keep 4 partitions)",
    )
    p.add_argument("--rate", type=float, default=2000.0, help="offered events/s (default 2000)")
    p.add_argument("--batch-size", type=int, default=10, help="events per request (default 10)")
    p.add_argument("--users", type=int, default=8, help="Locust users (default 8)")
    p.add_argument("--keys", type=int, default=2000, help="aggregates (default 2000)")
    p.add_argument("--distribution", choices=["uniform", "zipf"], default="uniform")
    p.add_argument("--zipf-s", type=float, default=1.1)
    p.add_argument("--sample-interval", type=float, default=1.0)
    p.add_argument(
        "--catch-up-seconds",
        type=float,
        default=1.0,
        help="a partition has caught up when its oldest unapplied event is at most this old (default 1)",
    )
    p.add_argument("--drain-timeout", type=float, default=300.0)
    add_output_flags(p, "scale-experiment")
    p.add_argument(
        "--scratch", type=Path, default=OUT / "scale-experiment" / "run", help="logs and Locust reports"
    )
    p.add_argument("--locust-dir", type=Path, default=Path("loadtest"))
    p.add_argument(
        "--database", default=SCALE_DATABASE, help="dropped and re-created (default projectionist_scale)"
    )
    p.add_argument("--name", default="scale-experiment", help="file name of the outputs")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = Options(**{k: v for k, v in vars(args).items() if k != "publish"})
    if not (options.locust_dir / LOCUSTFILES["http"]).exists():
        print(f"make scale-experiment: no locustfiles in {options.locust_dir}; run from the repository root")
        return 2
    started_at = dt.datetime.now(dt.UTC)
    experiment = Experiment(options)
    try:
        verification = experiment.run()
    except (ProjectionistError, KeyboardInterrupt) as e:
        print(f"make scale-experiment: {e or 'interrupted'}", file=sys.stderr)
        return 1
    path = write_outputs(experiment, verification, started_at)
    print("\n".join(format_verification(verification)))
    print(f"results: {path} (+ .csv, -phases.csv, .png)")
    if args.publish:
        files = [path.with_name(path.stem + suffix) for suffix in (".md", ".csv", "-phases.csv", ".png")]
        print(f"published: {', '.join(map(str, publish(files)))}")
    if experiment.load_failed:
        print(f"make scale-experiment: the load run failed: {experiment.load_failed}", file=sys.stderr)
        return 1
    return 0 if verification.ok else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
