"""``make autoscale-experiment``: a step load, an HPA on the SQL lag, real elastic workers coming and going.

The autoscaler is the one ``deploy/kubernetes/elastic/scaledobject.yaml``
describes, read from that file: the same SQL queries (``projectionist_lag()``),
targets, metric types, activation, replica bounds and HPA ``behavior``, run
by :mod:`experiments.hpa` with every duration divided by ``--scale`` (the
experiment's minutes are scaled minutes of the real thing). At each polling
interval it reads the queries and starts or stops real ``projectionist worker
--elastic`` processes (the newest first, as a scale-down picks its victim).
Like KEDA, it scales from zero when the lag passes the activation value, and
back to zero once every trigger has been inactive for ``cooldownPeriod``.

The load is the demo's appender at a rate that steps up and, later, stops.
The projection waits on a "slow service" for each event (experiments/slow_service.py):
on a 2-core machine more processes add capacity only for work that waits.
At the end the read model is verified exactly as the demo's is. The report
(a PNG and Markdown, with the targets) goes to ``out/autoscale-experiment/``.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

from experiments import autoscale_report as report
from experiments.autoscale_options import Options
from experiments.autoscale_report import Tick
from experiments.hpa import ScaledObjectModel, from_scaled_object
from projectionist.consume.checkpoints import register_group
from projectionist.consume.membership import read_membership
from projectionist.consume.partition_indexes import create_indexes
from projectionist.demo.sample_events import aggregate_name, sample_payload
from projectionist.demo.sample_projection import ScalableProjection
from projectionist.demo.verify import Verification, verify
from projectionist.records import NewEvent
from projectionist.settings import Settings
from projectionist.store.appending import StreamAppend, append_many
from projectionist.store.connection import connect, database_url
from projectionist.store.schema import migrate
from projectionist.testing import (
    ChildProcess,
    HarnessError,
    PostgresServer,
    child_env,
    poll_until,
    projectionist_command,
)
from projectionist.testing.reports import add_output_flags, publish

ROOT = Path(__file__).resolve().parent.parent
SCALED_OBJECT = ROOT / "deploy" / "kubernetes" / "elastic" / "scaledobject.yaml"
PROJECTION = "experiments.slow_service:SlowService"


class StepAppender:
    """Appends the demo's sample events at a rate that follows a schedule, in a thread of its own."""

    def __init__(self, database_url: str, schedule: Sequence[tuple[float, float]], aggregates: int) -> None:
        #: (monotonic start, events per second) pairs, in order.
        self.schedule = list(schedule)
        self.database_url = database_url
        self.aggregates = aggregates
        self.appended = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="step-appender", daemon=True)

    def rate(self, now: float) -> float:
        current = 0.0
        for start, rate in self.schedule:
            if now >= start:
                current = rate
        return current

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        if self.error is not None:
            raise HarnessError(f"the appender failed: {self.error!r}")

    def _run(self) -> None:
        try:
            with connect(self.database_url, application_name="autoscale:appender", autocommit=True) as conn:
                rng = random.Random(7)
                owed, next_aggregate = 0.0, 0
                last = time.monotonic()
                while not self._stop.wait(0.05):
                    now = time.monotonic()
                    owed += self.rate(now) * (now - last)
                    last = now
                    # Whole events, one transaction a tick (about 20 a second): never a
                    # burst to catch up after a stall.
                    count = min(int(owed), 500)
                    owed -= int(owed)
                    if not count:
                        continue
                    grouped: dict[str, list[NewEvent]] = {}
                    for _ in range(count):
                        aggregate = aggregate_name(next_aggregate % self.aggregates)
                        next_aggregate += 1
                        grouped.setdefault(aggregate, []).append(
                            NewEvent("SampleEvent", sample_payload(rng, aggregate))
                        )
                    with conn.transaction():
                        append_many(conn, [StreamAppend(a, events) for a, events in grouped.items()])
                    self.appended += count
        except BaseException as e:  # re-raised by stop()
            self.error = e


class ElasticFleet:
    """``projectionist worker --elastic`` processes; scaled down newest first."""

    def __init__(self, database_url: str, options: Options, logs: Path) -> None:
        self.env = child_env(
            {
                "DATABASE_URL": database_url,
                "SLOW_SERVICE_SECONDS": str(options.cost),
                "BATCH_SIZE": str(options.batch_size),
                "PARTITIONS": str(options.partitions),
            },
            drop_tracing=True,
            pythonpath=[ROOT],
        )
        self.logs = logs
        self.running: list[ChildProcess] = []
        self.started = 0

    def scale_to(self, n: int) -> None:
        while len(self.running) < n:
            self.started += 1
            name = f"worker-{self.started}"
            self.running.append(
                ChildProcess(
                    name,
                    projectionist_command(
                        "worker",
                        "--elastic",
                        "--projection",
                        PROJECTION,
                        "--no-migrate",
                        "--log-level",
                        "WARNING",
                    ),
                    env=self.env,
                    log_path=self.logs / f"{name}.log",
                    cwd=ROOT,
                )
            )
        while len(self.running) > n:
            child = self.running.pop()
            code = child.stop(30)
            if code != 0:
                raise HarnessError(f"{child.name} exited with {code} on SIGTERM:\n{child.output()}")

    def check(self) -> None:
        for child in self.running:
            if not child.alive():
                raise HarnessError(f"{child.name} died with {child.returncode}:\n{child.output()}")

    def close(self) -> None:
        for child in self.running:
            child.stop(10)
        self.running.clear()


def load_model(scale: float) -> tuple[ScaledObjectModel, dict[str, object]]:
    """The autoscaler of the shipped ScaledObject, its durations divided by ``scale``."""
    docs = [d for d in yaml.safe_load_all(SCALED_OBJECT.read_text()) if d]
    (scaled,) = [d for d in docs if d["kind"] == "ScaledObject"]
    return from_scaled_object(scaled["spec"], scale), scaled["spec"]


class Experiment:
    def __init__(self, options: Options, logs: Path) -> None:
        self.o = options
        self.logs = logs
        self.model, self.spec = load_model(options.scale)
        cooldown = float(self.spec.get("cooldownPeriod", 300))  # type: ignore[arg-type]
        self.cooldown = cooldown / options.scale
        self.ticks: list[Tick] = []

    def run(self) -> Verification:
        o = self.o
        url = PostgresServer(database_url(Settings.from_env())).create_database(o.database)
        with connect(url, autocommit=True) as conn:
            migrate(conn)
            register_group(conn, ScalableProjection.name, o.partitions)
            create_indexes(conn, o.partitions)
            ScalableProjection().setup(conn)
        self.conn = connect(url, autocommit=True, application_name="autoscale:autoscaler")
        fleet = ElasticFleet(url, o, self.logs)
        t0 = time.monotonic()
        self.step_at = t0 + o.seconds(o.base_minutes)
        self.stop_at = self.step_at + o.seconds(o.step_minutes)
        end = self.stop_at + o.seconds(o.after_minutes)
        appender = StepAppender(
            url, [(t0, o.base_rate), (self.step_at, o.step_rate), (self.stop_at, 0.0)], o.aggregates
        )
        try:
            appender.start()
            self._loop(fleet, appender, t0, end)
            appender.stop()
            # Whatever the autoscaler left running (nothing, at best), plus one to finish the backlog.
            fleet.scale_to(max(1, len(fleet.running)))
            drained = poll_until(lambda: self._lag()["events"] == 0, 120, 0.5)
            if drained is None:
                raise HarnessError("the workers did not catch up within 120 s of the end")
            fleet.close()
            return verify(self.conn, o.partitions)
        finally:
            fleet.close()
            self.conn.close()

    def _lag(self) -> dict[str, float]:
        row = self.conn.execute(
            "SELECT events_behind, lag_seconds, members, busy_members FROM projectionist_lag(%s)",
            (ScalableProjection.name,),
        ).fetchone()
        assert row is not None
        return {
            "events": float(row[0]),
            "lag": float(row[1]),
            "members": float(row[2]),
            "busy": float(row[3]),
        }

    def _one(self, query: str) -> float:
        row = self.conn.execute(query.encode()).fetchone()
        assert row is not None, query
        return float(row[0])

    def _loop(self, fleet: ElasticFleet, appender: StepAppender, t0: float, end: float) -> None:
        scaler = self.model.autoscaler
        interval = self.model.polling_interval
        inactive_since: float | None = None
        last_appended, last_t = 0, t0
        next_at = t0
        while True:
            now = time.monotonic()
            if now >= end:
                return
            fleet.check()
            if appender.error is not None:
                raise HarnessError(f"the appender failed: {appender.error!r}")
            # The ScaledObject's own queries, as its triggers run them.
            values = {name: self._one(query) for name, query in self.model.queries.items()}
            current = len(fleet.running)
            active = any(values[m.name] > m.activation for m in scaler.metrics)
            inactive_since = None if active else (inactive_since or now)
            if current == 0:
                desired = 1 if active else 0  # KEDA activates the target from zero
            elif inactive_since is not None and now - inactive_since >= self.cooldown:
                desired = 0  # KEDA: every trigger inactive for cooldownPeriod
            else:
                desired = scaler.desired(values, current, now)
            if desired != current:
                scaler.scaled(desired - current, now)
                fleet.scale_to(desired)
            appended = appender.appended
            group = read_membership(self.conn, ScalableProjection.name, self.o.partitions)
            self.ticks.append(
                Tick(
                    t=now - t0,
                    phase="base" if now < self.step_at else "step" if now < self.stop_at else "after",
                    offered=appender.rate(now),
                    appended_rate=(appended - last_appended) / (now - last_t) if now - last_t > 0.5 else 0.0,
                    replicas=desired,
                    values=values,
                    owned=tuple(len(m.owned) for m in group.members),
                )
            )
            last_appended, last_t = appended, now
            lag = values.get("lag", 0.0)
            print(
                f"  t={now - t0:6.1f}s rate {appender.rate(now):5.0f}/s lag {lag:6.2f}s "
                f"busy {values.get('busy', 0):.0f} replicas {current} -> {desired}",
                file=sys.stderr,
            )
            next_at += interval
            time.sleep(max(0.0, next_at - time.monotonic()))


def build_parser() -> argparse.ArgumentParser:
    defaults = Options()
    p = argparse.ArgumentParser(prog="python -m experiments.autoscale", description=__doc__)
    p.add_argument(
        "--scale", type=float, default=defaults.scale, help="time scale: real durations are divided by it"
    )
    p.add_argument("--base-rate", type=float, default=defaults.base_rate, help="events/s before the step")
    p.add_argument("--step-rate", type=float, default=defaults.step_rate, help="events/s during the step")
    p.add_argument(
        "--base-minutes", type=float, default=defaults.base_minutes, help="scaled minutes before the step"
    )
    p.add_argument(
        "--step-minutes", type=float, default=defaults.step_minutes, help="scaled minutes of the step"
    )
    p.add_argument(
        "--after-minutes",
        type=float,
        default=defaults.after_minutes,
        help="scaled minutes after the load stops",
    )
    p.add_argument(
        "--cost", type=float, default=defaults.cost, help="seconds each event waits on the slow service"
    )
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="events per batch")
    p.add_argument(
        "--database", default=defaults.database, help="the experiment's own database, created anew"
    )
    add_output_flags(p, "autoscale-experiment")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    o = Options(
        scale=args.scale,
        base_rate=args.base_rate,
        step_rate=args.step_rate,
        base_minutes=args.base_minutes,
        step_minutes=args.step_minutes,
        after_minutes=args.after_minutes,
        cost=args.cost,
        batch_size=args.batch_size,
        database=args.database,
        out=args.out,
        publish=args.publish,
    )
    o.out.mkdir(parents=True, exist_ok=True)
    logs = o.out / "logs"
    logs.mkdir(exist_ok=True)
    experiment = Experiment(o, logs)
    total = o.base_minutes + o.step_minutes + o.after_minutes
    print(
        f"autoscale experiment: {total:g} scaled minutes in {o.seconds(total):.0f} s "
        f"(time scale {o.scale:g}); "
        f"{o.base_rate:g} -> {o.step_rate:g} -> 0 events/s, {o.cost * 1000:g} ms of waiting per event",
        file=sys.stderr,
    )
    verification = experiment.run()
    files = report.write(
        experiment.ticks, o, experiment.model, experiment.cooldown, verification, os.getloadavg()
    )
    print(files["md"].read_text())
    if o.publish:
        print(f"published: {', '.join(map(str, publish([files['md'], files['png']])))}")
    outcome = report.targets(experiment.ticks, o, experiment.model)
    ok = verification.ok and all(t.ok for t in outcome)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
