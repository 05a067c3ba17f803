"""Elastic mode under load and faults: joins, graceful leaves, kill -9, a database restart, a host cut off.

One run (:func:`run_elastic`) starts elastic workers (``projectionist worker
--elastic``, real processes) on a cluster of its own while the append load
runs, and then, one at a time: workers join and leave (SIGTERM), workers are
killed with SIGKILL, PostgreSQL restarts, and a worker inside a network
namespace of the run's own loses its network (chaos/netns.py). An observer
reads the group's locks every 50 ms, so every ownership change is seen with
the server's own view of who holds what. The run ends like every chaos
scenario: the load stops, every event is applied, the workers stop, and the
read model is compared with a fold of the events table.

What it measures, per change: how long until a joiner holds its fair share
(±1 partition), until a leaver's or a killed worker's partitions are owned
again, until a cut-off host's are; how many partitions moved; how long the
events of the partitions that did not move waited to be applied meanwhile
(the "processing gap"); and whether the cut-off worker committed anything
once it was cut off. chaos/elastic_bench.py turns runs into the targets table.
"""

from __future__ import annotations

import math
import random
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from chaos import partition_cost
from chaos.checks import Db, Fold
from chaos.fleet import RECORDER, ROOT, WorkerProcess, WorkerSpec
from chaos.load import Load
from chaos.netns import CutOffHost, NetnsUnavailable, why_unavailable
from chaos.observer import PROJECTION, Observer, Sample
from chaos.report import Check
from chaos.server import ChaosServer
from projectionist.consume import membership, partition_indexes
from projectionist.consume.checkpoints import register_group
from projectionist.store.connection import connect
from projectionist.testing import ChildProcess, child_env, poll_until, projectionist_command, stop_all


@dataclass(frozen=True, slots=True)
class ElasticProfile:
    """How much of everything one run does: ``FULL`` for ``make elastic-bench``, ``QUICK`` for CI."""

    name: str
    load_rate: float
    changes: int
    kills: int
    restarts: int
    host_cut: bool
    min_members: int = 2
    max_members: int = 6
    partitions: int = 16
    #: Pause after each change settled, before the next one.
    settle: float = 1.0
    warmup: float = 3.0
    poll_interval: float = 1.0
    rebalance_interval: float = 0.5
    catch_up_timeout: float = 90.0


FULL = ElasticProfile("full", load_rate=400.0, changes=20, kills=5, restarts=1, host_cut=True)
QUICK = ElasticProfile(
    "quick",
    load_rate=300.0,
    changes=6,
    kills=2,
    restarts=1,
    host_cut=True,
    max_members=4,
    settle=0.5,
    warmup=1.0,
)


@dataclass(frozen=True, slots=True)
class ElasticSpec(WorkerSpec):
    """``projectionist worker --elastic``; ``total_workers`` is the partition count of a new group."""

    rebalance_interval: float = 0.5

    def args(self) -> list[str]:
        return [
            "worker",
            "--elastic",
            *("--partitions", str(self.total_workers), "--projection", self.projection),
            *("--batch-size", str(self.batch_size), "--poll-interval", str(self.poll_interval)),
            *("--rebalance-interval", str(self.rebalance_interval), "--no-migrate"),
        ]


# -- the run's results ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Change:
    """One join or graceful leave."""

    kind: str  # "join" or "leave"
    members_after: int
    #: Join: seconds from the process's start until it held its fair share ±1. Leave: from
    #: SIGTERM until every partition it held was owned by another member.
    seconds: float
    #: Until every partition was owned and every member held exactly its share.
    settle_seconds: float
    moves: int
    bound: int
    #: The partitions that did not move, and the longest an event of theirs created meanwhile
    #: waited to be applied (seconds; None before the run's end computed it).
    db_window: tuple[datetime, datetime]
    moved: frozenset[int]


@dataclass
class ElasticRun:
    profile: str
    partitions: int
    changes: list[Change] = field(default_factory=list)
    kills: list[float] = field(default_factory=list)
    restarts: list[float] = field(default_factory=list)
    cut_seconds: float | None = None
    cut_commits_after: int | None = None
    cut_unavailable: str | None = None
    #: Per change: the longest apply delay of an event of a partition that did not move.
    gaps: list[float] = field(default_factory=list)
    #: The same, for the partitions that moved: how long a move pauses them.
    moved_gaps: list[float] = field(default_factory=list)
    #: The longest apply delay while nothing moved, for comparison.
    quiet_gap: float | None = None
    #: Median microseconds of a checkpoint update without and with the lock fence, under load.
    fence_cost_us: tuple[float, float] | None = None
    fold: Fold | None = None
    checks: list[Check] = field(default_factory=list)
    error: str | None = None
    logs: str = ""
    duration_seconds: float = 0.0
    load_average: tuple[float, float, float] = (0.0, 0.0, 0.0)
    poll_interval: float = 1.0

    @property
    def ok(self) -> bool:
        return (
            self.error is None
            and self.fold is not None
            and self.fold.exact
            and all(c.ok for c in self.checks)
        )

    def explain(self) -> str:
        lines = [f"elastic run ({self.profile}): {'PASS' if self.ok else 'FAIL'}", *map(str, self.checks)]
        if self.fold is not None and not self.fold.exact:
            lines.append(f"FAIL read model differs from the reference fold: {self.fold}")
        if self.error:
            lines.append(f"ERROR {self.error}")
        if not self.ok:
            lines += ["", self.logs]
        return "\n".join(lines)


# -- the run --------------------------------------------------------------------------------------


class ElasticHarness:
    """One run's server, database, members, load and observer."""

    def __init__(self, profile: ElasticProfile, log_dir: Path, seed: int, cut: CutOffHost | None) -> None:
        self.profile = profile
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.rng = random.Random(seed)
        self.cut = cut
        self.server = ChaosServer()
        if cut is not None:
            self.server.pg.settings["listen_addresses"] = f"127.0.0.1,{cut.host_ip}"
        self.server.start()
        if cut is not None:
            hba = self.server.pg.data_dir / "pg_hba.conf"
            with hba.open("a") as f:
                f.write(f"host all all {cut.subnet} trust\n")
            with self.server.admin() as admin:
                admin.execute("SELECT pg_reload_conf()")
        self.url = self.server.scenario_database("elastic")
        self.db = Db(self.url)
        self.env = child_env({"RECORDER_SLEEP": "0.005"}, drop_tracing=True, pythonpath=[ROOT])
        self.members: list[WorkerProcess] = []
        self.all: list[WorkerProcess] = []
        self.outsider: ChildProcess | None = None
        self.load = Load(self.url, rate=profile.load_rate, aggregates=160, seed=seed)
        self.observer = Observer(self.url, profile.partitions)
        self.run = ElasticRun(profile.name, profile.partitions, poll_interval=profile.poll_interval)
        self._spec = ElasticSpec(
            0,
            profile.partitions,
            RECORDER,
            batch_size=100,
            poll_interval=profile.poll_interval,
            rebalance_interval=profile.rebalance_interval,
        )

    def check(self, ok: bool, what: str, detail: str = "") -> bool:
        self.run.checks.append(Check(what, bool(ok), detail))
        return bool(ok)

    # -- members --------------------------------------------------------------

    def spawn(self) -> WorkerProcess:
        name = f"e{len(self.all)}"
        proc = WorkerProcess(
            self._spec,
            self.url,
            name=name,
            log_path=self.log_dir / f"{name}.log",
            env=self.env,
            probe_interval=0.5,
        )
        proc.start()
        self.members.append(proc)
        self.all.append(proc)
        return proc

    def backend_of(self, os_pid: int, timeout: float = 30) -> int | None:
        """The database session of the worker process ``os_pid``, found by its application_name."""
        app = membership.application_name(PROJECTION, f"%:{os_pid}")
        found: list[int] = []

        def find() -> bool:
            value = self.db.scalar(
                "SELECT pid FROM pg_stat_activity"
                " WHERE application_name LIKE %s AND backend_type = 'client backend'",
                (app,),
            )
            if value is not None:
                found.append(int(value))
            return bool(found)

        poll_until(find, timeout)
        return found[0] if found else None

    def db_now(self) -> datetime:
        value = self.db.scalar("SELECT clock_timestamp()")
        assert isinstance(value, datetime)
        return value

    def members_now(self) -> int:
        last = self.observer.last
        return len(last.members) if last else 0

    def wait_settled(self, since: float, timeout: float = 30) -> Sample | None:
        expected = len(self.members) + (1 if self.outsider is not None and self.outsider.alive() else 0)
        return self.observer.wait(
            lambda s: len(s.members) == expected and s.settled(self.profile.partitions), since, timeout
        )

    # -- phases ---------------------------------------------------------------

    def start(self) -> None:
        with connect(self.url, autocommit=True) as conn:
            register_group(conn, PROJECTION, self.profile.partitions)
            partition_indexes.create_indexes(conn, self.profile.partitions)
        self.observer.start()
        self.load.start()
        for _ in range(self.profile.min_members):
            self.spawn()
        settled = self.wait_settled(time.monotonic(), 60)
        self.check(settled is not None, f"{self.profile.min_members} members start and share the partitions")
        applied = poll_until(lambda: self.db.applied(PROJECTION) > 0, 30)
        self.check(applied is not None, "events are applied before the first change")
        quiet_from = self.db_now()
        time.sleep(self.profile.warmup)
        self.run.quiet_gap = self.apply_delay(quiet_from, self.db_now(), frozenset(), moved=False)

    def join(self) -> None:
        p = self.profile
        spawned_at = time.monotonic()
        db_from = self.db_now()
        before = set((self.observer.last or Sample(0, {}, {})).members.values())
        proc = self.spawn()
        members_after = len(self.members) + (1 if self.outsider is not None else 0)
        share = p.partitions // members_after

        def holds_share(s: Sample) -> bool:
            new = [pid for pid in s.members.values() if pid not in before]
            return bool(new) and len(s.held_by(new[0])) >= share - 1

        fair = self.observer.wait(holds_share, spawned_at, 60)
        settled = self.wait_settled(spawned_at, 60)
        if not self.check(
            fair is not None and settled is not None,
            f"a join to {members_after} members settles",
            proc.describe(),
        ):
            return
        assert fair is not None and settled is not None
        time.sleep(0.3)
        self._record(
            "join",
            members_after,
            fair.at - spawned_at,
            settled.at - spawned_at,
            spawned_at,
            settled.at,
            db_from,
        )

    def leave(self) -> None:
        victim = self.rng.choice(self.members[1:] if len(self.members) > 1 else self.members)
        backend = self.backend_of(victim.pid, 5)
        last = self.observer.last
        held = last.held_by(backend) if last is not None and backend is not None else set()
        db_from = self.db_now()
        t0 = time.monotonic()
        victim.terminate()
        self.members.remove(victim)
        reowned = self.observer.wait(
            lambda s: all(s.owners.get(k) not in (None, backend) for k in held), t0, 60
        )
        code = victim.child.reap(30)
        settled = self.wait_settled(t0, 60)
        members_after = len(self.members) + (1 if self.outsider is not None else 0)
        if not self.check(
            reowned is not None and settled is not None and code == 0,
            f"a graceful leave to {members_after} members is taken over",
            f"exit {code}, held {sorted(held)}",
        ):
            return
        assert reowned is not None and settled is not None
        time.sleep(0.3)
        self._record(
            "leave",
            members_after,
            reowned.at - t0,
            settled.at - t0,
            t0,
            settled.at,
            db_from,
            bound_members=members_after + 1,
        )

    def _record(
        self,
        kind: str,
        members_after: int,
        seconds: float,
        settle: float,
        since: float,
        until: float,
        db_from: datetime,
        bound_members: int | None = None,
    ) -> None:
        p = self.profile
        moved_set, moves = self.observer.moves(since, until)
        moved = frozenset(moved_set)
        n = bound_members or members_after
        # A join to N members, or a leave from N: ceil(P/N) + 1 (N counts the joiner or the leaver).
        bound = math.ceil(p.partitions / n) + 1
        self.run.changes.append(
            Change(kind, members_after, seconds, settle, moves, bound, (db_from, self.db_now()), moved)
        )

    def kill(self) -> None:
        victim = self.rng.choice(self.members)
        backend = self.backend_of(victim.pid, 5)
        last = self.observer.last
        held = last.held_by(backend) if last is not None and backend is not None else set()
        killed_at = victim.kill9()
        self.members.remove(victim)
        reowned = self.observer.wait(
            lambda s: all(s.owners.get(k) not in (None, backend) for k in held), killed_at, 60
        )
        if self.check(
            reowned is not None, "a killed worker's partitions are owned again", f"held {sorted(held)}"
        ):
            assert reowned is not None
            self.run.kills.append(reowned.at - killed_at)
        # Its supervisor starts it again: a join, not measured.
        self.spawn()
        self.wait_settled(time.monotonic(), 60)

    def restart_database(self, mode: str) -> None:
        self.db.close()
        self.server.stop(mode)
        time.sleep(2.0)
        self.server.start()
        up_at = time.monotonic()
        settled = self.wait_settled(up_at, 90)
        if self.check(settled is not None, f"after a {mode} restart every partition is owned again"):
            assert settled is not None
            self.run.restarts.append(settled.at - up_at)

    def host_cut(self) -> None:
        cut = self.cut
        if cut is None:
            self.run.cut_unavailable = why_unavailable() or "no network namespace"
            return
        url = f"postgresql://postgres@{cut.host_ip}:{self.server.pg.port}/{self.url_dbname()}"
        args = [*self._spec.args(), "--metrics-port", "0", "--log-level", "INFO"]
        start = time.monotonic()
        self.outsider = ChildProcess(
            "outsider",
            cut.wrap(projectionist_command(*args)),
            env={**self.env, "DATABASE_URL": url},
            log_path=self.log_dir / "outsider.log",
            cwd=ROOT,
        )
        settled = self.wait_settled(start, 60)
        backend = self.backend_of(self.outsider.pid, 10)
        joined = settled is not None and backend is not None
        if not self.check(
            joined, "a worker on another network joins", "" if joined else self.outsider.output(800)
        ):
            return
        assert backend is not None
        last = self.observer.last
        held = last.held_by(backend) if last else set()
        self.check(
            bool(held), "the worker on the other network owns partitions before the cut", str(sorted(held))
        )
        cut_at = time.monotonic()
        cut.cut()
        time.sleep(0.2)
        committed = self._applied_by(backend)
        reowned = self.observer.wait(
            lambda s: all(s.owners.get(k) not in (None, backend) for k in held), cut_at, 60
        )
        if self.check(reowned is not None, "a cut-off host's partitions are owned again"):
            assert reowned is not None
            self.run.cut_seconds = reowned.at - cut_at
        time.sleep(2.0)
        self.run.cut_commits_after = self._applied_by(backend) - committed
        self.check(
            self.run.cut_commits_after == 0,
            "the cut-off worker commits nothing once cut off",
            f"{self.run.cut_commits_after} events",
        )
        cut.restore()
        # Its connection is gone; it joins again with a new session once it notices.
        rejoined = self.wait_settled(time.monotonic(), 60)
        self.check(rejoined is not None, "the cut-off worker joins again once its network is back")

    def url_dbname(self) -> str:
        return (
            self.url.rsplit("dbname=", 1)[-1].split()[0]
            if "dbname=" in self.url
            else self.url.rsplit("/", 1)[-1]
        )

    def _applied_by(self, backend: int) -> int:
        return int(self.db.scalar("SELECT count(*) FROM applied_events WHERE applied_by = %s", (backend,)))

    def apply_delay(
        self, since: datetime, until: datetime, partitions: frozenset[int], *, moved: bool
    ) -> float:
        """The longest an event created in [since, until] waited to be applied (database clock).

        ``moved``: only the events of ``partitions``; otherwise only those of the other partitions.
        """
        value = self.db.scalar(
            "SELECT coalesce(max(extract(epoch FROM a.applied_at - e.created_at)), 0)::float8"
            " FROM applied_events a JOIN events e USING (event_id)"
            " WHERE a.projection = %s AND e.created_at BETWEEN %s AND %s"
            " AND (e.partition_hash %% %s = ANY(%s)) = %s",
            (PROJECTION, since, until, self.profile.partitions, sorted(partitions), moved),
        )
        return float(value or 0.0)

    def measure_fence(self) -> None:
        """What the lock fence adds to a checkpoint update, with the members' locks in the lock table."""
        self.run.fence_cost_us = partition_cost.fence_cost(self.url)

    def finish(self) -> None:
        """Stop the load, let the members catch up, stop them, and compare with the reference fold."""
        try:
            self.load.stop()
        except Exception as e:
            self.check(False, "the append load ran without unexpected errors", repr(e))
        caught_up = poll_until(lambda: self.db.unapplied(PROJECTION) == 0, self.profile.catch_up_timeout, 0.2)
        self.check(
            caught_up is not None,
            "every event of the store is applied once the load stops",
            f"{self.db.unapplied(PROJECTION)} of {self.db.event_count()} not applied",
        )
        time.sleep(0.5)  # an event applied twice would land now
        for change in self.run.changes:
            since, until = change.db_window
            self.run.gaps.append(self.apply_delay(since, until, change.moved, moved=False))
            if change.moved:
                self.run.moved_gaps.append(self.apply_delay(since, until, change.moved, moved=True))
        running = [p.child for p in self.members if p.alive()]
        if self.outsider is not None and self.outsider.alive():
            running.append(self.outsider)
        codes = stop_all(running, 30)
        self.check(
            all(code == 0 for code in codes.values()),
            f"the {len(running)} running members stop cleanly on SIGTERM (exit 0)",
            ", ".join(f"{name}: {code}" for name, code in codes.items() if code != 0),
        )
        self.run.fold = self.db.fold(PROJECTION)

    def logs(self, limit: int = 1500) -> str:
        parts = [f"--- {p.name} (exit {p.returncode}) ---\n{p.log_tail(limit)}" for p in self.all]
        if self.outsider is not None:
            parts.append(f"--- outsider (exit {self.outsider.returncode}) ---\n{self.outsider.output(limit)}")
        return "\n".join(parts)

    def close(self) -> None:
        self.load.stop_quietly()
        for p in self.all:
            p.close()
        if self.outsider is not None:
            self.outsider.close()
        self.observer.close()
        self.db.close()
        self.server.destroy()


def _direction(members: int, profile: ElasticProfile, going_up: bool) -> bool:
    """Join while below the maximum, leave while above the minimum, turning at each end."""
    if members >= profile.max_members:
        return False
    if members <= profile.min_members:
        return True
    return going_up


def run_elastic(profile: ElasticProfile, log_dir: Path, seed: int = 1) -> ElasticRun:
    """One run of every change and fault; never raises for a failed check or a crash of the run."""
    import os

    started = time.monotonic()
    cut: CutOffHost | None = None
    if profile.host_cut and why_unavailable() is None:
        cut = CutOffHost()
        try:
            cut.create()
        except NetnsUnavailable:
            cut.close()
            cut = None
    h: ElasticHarness | None = None
    run = ElasticRun(profile.name, profile.partitions, poll_interval=profile.poll_interval)
    try:
        h = ElasticHarness(profile, log_dir, seed, cut)
        run = h.run
        h.start()
        going_up = True
        for _ in range(profile.changes):
            going_up = _direction(len(h.members), profile, going_up)
            (h.join if going_up else h.leave)()
            time.sleep(profile.settle)
            if not run.ok and run.checks and not run.checks[-1].ok:
                break
        for _ in range(profile.kills):
            h.kill()
            time.sleep(profile.settle)
        for i in range(profile.restarts):
            h.restart_database(("fast", "immediate")[i % 2])
            time.sleep(profile.settle)
        if profile.host_cut:
            h.host_cut()
        h.measure_fence()
        h.finish()
    except Exception:
        run.error = traceback.format_exc(limit=8)
    finally:
        if h is not None:
            if not run.ok:
                run.logs = h.logs()
            h.close()
        if cut is not None:
            cut.close()
        run.duration_seconds = time.monotonic() - started
        run.load_average = os.getloadavg()
    return run
