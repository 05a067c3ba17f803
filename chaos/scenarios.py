"""The scenarios: one fault each, injected into real worker processes while the append load runs.

Every scenario ends the same way (:meth:`Harness.finish`): stop the load,
wait until every event of the store is applied, stop the workers with
SIGTERM, and compare the read model with a fold of the events table (0 lost,
0 applied twice, per-aggregate order kept, every event applied by the
partition that owns it). In between, each scenario checks what must hold
during its fault, including what ``/readyz`` said, and measures how long the
workers took to recover. Recovery is never helped by hand: the only outside
actions are those of a supervisor (restarting a killed process, as systemd's
``Restart=always`` or Kubernetes would) and, for the poison events, the
operator's fix that the policy waits for.
"""

from __future__ import annotations

import random
import subprocess
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chaos.checks import Db
from chaos.fleet import POISON_SENSITIVE, ROOT, Fleet, Observation, WorkerProcess, WorkerSpec
from chaos.load import AGGREGATE_PREFIX, Load
from chaos.report import Check, ScenarioResult
from chaos.server import ChaosServer
from projectionist.consume.partition_indexes import create_indexes
from projectionist.partitioning import partition_of
from projectionist.records import NewEvent
from projectionist.store.appending import append
from projectionist.store.connection import connect
from projectionist.testing import child_env, poll_until, projectionist_command

#: Standby takeover must happen within this many seconds of the owner's death.
TAKEOVER_LIMIT = 5.0


@dataclass(frozen=True, slots=True)
class Profile:
    """How long and how often: ``FULL`` for ``make chaos``, ``CI`` for the trimmed test run."""

    name: str
    warmup: float
    load_rate: float
    kill_rounds: int
    kill_interval: float
    restarts: int
    downtime: float
    drops: int
    drop_interval: float
    long_transaction: float
    rescale_phase: float
    takeovers: int
    takeover_interval: float
    poison_hold: float
    catch_up_timeout: float = 90.0


FULL = Profile(
    name="full",
    warmup=3.0,
    load_rate=400.0,
    kill_rounds=10,
    kill_interval=3.0,
    restarts=2,
    downtime=5.0,
    drops=8,
    drop_interval=2.0,
    long_transaction=30.0,
    rescale_phase=6.0,
    takeovers=4,
    takeover_interval=3.0,
    poison_hold=10.0,
)

CI = Profile(
    name="ci",
    warmup=1.0,
    load_rate=300.0,
    kill_rounds=4,
    kill_interval=1.0,
    restarts=2,
    downtime=2.0,
    drops=4,
    drop_interval=1.0,
    long_transaction=6.0,
    rescale_phase=2.0,
    takeovers=2,
    takeover_interval=1.0,
    poison_hold=4.0,
    catch_up_timeout=60.0,
)

# Each batch sleeps this long inside its transaction, so faults often land
# between a batch's writes and its commit: the window where a double
# application or a lost event would be born.
_RECORDER_SLEEP = 0.01
# Poison (park): batches of the poisoned partition hold its dead letters
# locked while they apply, and the operator's retry must not lose a letter
# parked by a batch it ran into. Longer batches make that meeting likely.
_PARK_RECORDER_SLEEP = 0.05


def _seconds(values: Sequence[float], what: str) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f} s"
    return f"max {max(values):.2f} s, mean {sum(values) / len(values):.2f} s ({len(values)} {what})"


def _not_ready(o: Observation) -> bool:
    return not o.ready


class Harness:
    """One scenario's database, workers, load, observer connection and result."""

    def __init__(
        self,
        server: ChaosServer,
        profile: Profile,
        name: str,
        log_root: Path,
        seed: int,
        recorder_sleep: float = _RECORDER_SLEEP,
    ) -> None:
        self.server = server
        self.profile = profile
        self.url = server.scenario_database(name.replace("-", "_"))
        self.db = Db(self.url)
        self.fleet = Fleet(self.url, log_root / name, extra_env={"RECORDER_SLEEP": str(recorder_sleep)})
        self.load = Load(self.url, rate=profile.load_rate, seed=seed)
        self.result = ScenarioResult(name)

    def check(self, ok: bool, what: str, detail: str = "") -> bool:
        self.result.checks.append(Check(what, bool(ok), detail))
        return bool(ok)

    def group(self, total: int, role: str = "", **spec: Any) -> list[WorkerProcess]:
        return [self.fleet.spawn(WorkerSpec(k, total, **spec), role) for k in range(total)]

    def all_ready(self, procs: Sequence[WorkerProcess]) -> bool:
        return all(p.ready() for p in procs)

    def recovered(
        self, procs: Sequence[WorkerProcess], projection: str, total: int, old_owners: set[int]
    ) -> bool:
        """Every process ready, and every partition owned by a database session that is not an old one."""
        if not self.all_ready(procs):
            return False
        owners = self.db.owners(projection, total)
        return set(owners) == set(range(total)) and not set(owners.values()) & old_owners

    def wait_recovered(
        self,
        procs: Sequence[WorkerProcess],
        total: int,
        old_owners: set[int] | None = None,
        projection: str = "recorder",
        timeout: float = 60,
    ) -> float | None:
        return poll_until(lambda: self.recovered(procs, projection, total, old_owners or set()), timeout)

    def wait_state(self, procs: Sequence[WorkerProcess], state: str, timeout: float = 60) -> float | None:
        """Until every process's ``/readyz`` reports ``state``."""
        return poll_until(lambda: all(p.last is not None and p.last.state == state for p in procs), timeout)

    def warm_up(self, procs: Sequence[WorkerProcess], projection: str = "recorder") -> None:
        self.load.start()
        ready = poll_until(lambda: self.all_ready(procs), 60)
        self.check(ready is not None, "workers start and report ready", _states(procs))
        applied = poll_until(lambda: self.db.applied(projection) > 0, 30)
        self.check(applied is not None, "events are applied before the fault")
        time.sleep(self.profile.warmup)

    def finish(self, projection: str = "recorder") -> None:
        """Stop the load, let the workers catch up, stop them, and compare with the reference fold."""
        try:
            self.load.stop()
        except Exception as e:
            self.check(False, "the append load ran without unexpected errors", repr(e))
        caught_up = poll_until(lambda: self.db.unapplied(projection) == 0, self.profile.catch_up_timeout, 0.2)
        self.check(
            caught_up is not None,
            "every event of the store is applied once the load stops",
            f"{self.db.unapplied(projection)} of {self.db.event_count()} not applied",
        )
        time.sleep(0.5)  # an event applied twice would land now
        running = self.fleet.running()
        codes = self.fleet.stop(running)
        self.check(
            all(code == 0 for code in codes.values()),
            f"the {len(running)} running workers stop cleanly on SIGTERM (exit 0)",
            ", ".join(f"{name}: {code}" for name, code in codes.items() if code != 0),
        )
        self.result.fold = self.db.fold(projection)

    def close(self) -> None:
        self.load.stop_quietly()
        self.fleet.close()
        self.db.close()


def _states(procs: Sequence[WorkerProcess]) -> str:
    return "; ".join(f"{p.name}: {p.describe()}" for p in procs)


# -- the scenarios ----------------------------------------------------------------


def kill_9(h: Harness) -> None:
    """A random worker is killed with SIGKILL every few seconds; its supervisor restarts it at once."""
    p = h.profile
    workers = h.group(4)
    h.warm_up(workers)
    rng = random.Random(9)
    recoveries: list[float] = []
    bystanders_wavered: list[str] = []
    for _ in range(p.kill_rounds):
        time.sleep(p.kill_interval)
        victim = rng.choice(workers)
        old_owner = h.db.owners("recorder", 4).get(victim.spec.worker_id)
        killed_at = victim.kill9()
        replacement = h.fleet.spawn(victim.spec, "restarted")
        index = workers.index(victim)
        workers[index] = replacement
        old = {old_owner} if old_owner is not None else set()
        done = h.wait_recovered(workers, 4, old)
        if not h.check(
            done is not None,
            f"partition {victim.spec.partition} recovers after kill -9",
            "" if done is None else f"{done - killed_at:.2f} s",
        ):
            break
        assert done is not None
        recoveries.append(done - killed_at)
        bystanders_wavered += [
            w.name for i, w in enumerate(workers) if i != index and w.saw(_not_ready, killed_at, done)
        ]
    h.check(
        len(recoveries) == p.kill_rounds,
        f"{p.kill_rounds} kills, each followed by the restarted process owning the partition again",
    )
    h.check(
        not bystanders_wavered,
        "the other workers stayed ready during each kill",
        ", ".join(bystanders_wavered),
    )
    h.result.faults = f"kill -9 x{len(recoveries)} (random worker every {p.kill_interval:g} s)"
    h.result.recovery_seconds = max(recoveries, default=None)
    h.result.recovery = _seconds(recoveries, "kills")
    h.result.readyz = "killed: down; restarted: 200 again; others: 200 throughout"
    h.finish()


def database_restart(h: Harness) -> None:
    """PostgreSQL is stopped and started again on the same data directory.

    Restarts alternate between a clean shutdown (``fast``: sessions are told
    and terminated) and a crash (``immediate``: no goodbye, crash recovery at
    the next start).
    """
    p = h.profile
    workers = h.group(4)
    h.warm_up(workers)
    recoveries: list[float] = []
    modes = [("fast", "immediate")[i % 2] for i in range(p.restarts)]
    for mode in modes:
        time.sleep(p.kill_interval)
        old = set(h.db.owners("recorder", 4).values())
        h.db.close()
        down_at = time.monotonic()
        h.server.stop(mode)
        time.sleep(p.downtime)
        h.server.start()
        up_at = time.monotonic()
        done = h.wait_recovered(workers, 4, old)
        if not h.check(
            done is not None,
            f"every worker is ready and owns its partition again after the {mode} restart",
            "" if done is None else f"{done - up_at:.2f} s after the server was back",
        ):
            break
        assert done is not None
        recoveries.append(done - up_at)
        unaware = [
            w.name
            for w in workers
            if not w.saw(lambda o: o.code == 503 and "database" in o.reason + o.state, down_at, up_at + 1)
            and not w.saw(lambda o: o.state == "failing", down_at, done)
        ]
        h.check(
            not unaware,
            "every worker reported not ready (503) while the database was down",
            ", ".join(unaware),
        )
    h.check(len(recoveries) == p.restarts, f"{p.restarts} restart(s) survived without manual action")
    h.result.faults = f"restart x{len(recoveries)} ({', '.join(modes)}; {p.downtime:g} s down each)"
    h.result.recovery_seconds = max(recoveries, default=None)
    h.result.recovery = _seconds(recoveries, "restarts") + " after the server was back"
    h.result.readyz = "200 → 503 (database unreachable / failing) → 200"
    h.finish()


def connection_drop(h: Harness) -> None:
    """The workers' database sessions are terminated with pg_terminate_backend().

    Every other drop also terminates the sessions of the workers' metrics
    pools, which serve scrapes and the ``/readyz`` database ping.
    """
    p = h.profile
    workers = h.group(4)
    h.warm_up(workers)
    recoveries: list[float] = []
    terminated = sessions = 0
    start = time.monotonic()
    for i in range(p.drops):
        time.sleep(p.drop_interval)
        old = set(h.db.owners("recorder", 4).values())
        # Every other time, the metrics pools' sessions (scrapes, /readyz pings) go too.
        pattern = "projectionist:%" if i % 2 else "projectionist:recorder:%"
        dropped_at = time.monotonic()
        row = h.db.rows(
            "WITH t AS MATERIALIZED ("
            "  SELECT application_name AS app, pg_terminate_backend(pid) AS ok FROM pg_stat_activity"
            "  WHERE datname = current_database() AND application_name LIKE %s)"
            " SELECT count(*) FILTER (WHERE app LIKE 'projectionist:recorder:%%'), count(*) FROM t WHERE ok",
            (pattern,),
        )[0]
        terminated += int(row[0])
        sessions += int(row[1])
        done = h.wait_recovered(workers, 4, old)
        if not h.check(
            done is not None,
            "every worker reconnects and owns its partition again",
            "" if done is None else f"{done - dropped_at:.2f} s",
        ):
            break
        assert done is not None
        recoveries.append(done - dropped_at)
    h.check(
        terminated == 4 * p.drops, "each drop terminated the 4 workers' sessions", f"{terminated} terminated"
    )
    errors = {w.name: w.sample("projectionist_errors_total", error_type="database") or 0.0 for w in workers}
    h.check(
        all(v >= p.drops for v in errors.values()),
        f"each worker counted every drop in its database errors counter (>= {p.drops})",
        str(errors),
    )
    failing_seen = sum(w.saw(lambda o: o.state == "failing", start) for w in workers)
    h.check(
        failing_seen > 0, "/readyz reported the reconnecting worker as failing (503)", f"{failing_seen} of 4"
    )
    h.result.faults = (
        f"pg_terminate_backend x{len(recoveries)} "
        f"({terminated} worker + {sessions - terminated} metrics sessions)"
    )
    h.result.recovery_seconds = max(recoveries, default=None)
    h.result.recovery = _seconds(recoveries, "drops")
    h.result.readyz = f"200 → 503 failing (seen on {failing_seen}/4 workers) → 200"
    h.finish()


def long_transaction(h: Harness) -> None:
    """A transaction that has written an event stays open: readers stall, skip nothing, and it shows."""
    p = h.profile
    workers = h.group(4)
    h.warm_up(workers)
    settle = 1.5  # transactions older than the long one still become visible in this time
    oldest_age = 0.0
    applied: list[tuple[float, int]] = []
    with connect(h.url, application_name="chaos:long-transaction", autocommit=True) as long_conn:
        with long_conn.transaction():
            append(long_conn, "long-transaction", [NewEvent("LongTransaction", {})])
            opened_at = time.monotonic()
            appended_before = h.load.appended
            while time.monotonic() < opened_at + p.long_transaction:
                applied.append((time.monotonic(), h.db.applied("recorder")))
                age = workers[0].sample("projectionist_oldest_transaction_age_seconds")
                oldest_age = max(oldest_age, age or 0.0)
                time.sleep(0.5)
            appended_during = h.load.appended - appended_before
            head = h.db.head()
        committed_at = time.monotonic()
    stalled = [n for t, n in applied if t >= opened_at + settle]
    h.check(
        len(stalled) >= 2 and stalled[0] == stalled[-1] and appended_during > 0,
        "readers stalled behind the open transaction (no event applied while it was open)",
        f"applied {stalled[0] if stalled else '?'} -> {stalled[-1] if stalled else '?'} "
        f"while {appended_during} events were appended",
    )
    h.check(
        oldest_age >= p.long_transaction - 2.0,
        "projectionist_oldest_transaction_age_seconds showed the open transaction",
        f"max {oldest_age:.1f} s for a {p.long_transaction:g} s transaction",
    )
    wavered = [w.name for w in workers if w.saw(_not_ready, opened_at, committed_at)]
    h.check(
        not wavered, "workers stayed ready while stalled (the lag and the metric show it)", ", ".join(wavered)
    )
    done = poll_until(lambda: h.db.unapplied("recorder", up_to_position=head) == 0, 60)
    h.check(
        done is not None,
        "after the commit, every event held back (and the long transaction's own) is applied",
        f"{h.db.unapplied('recorder', up_to_position=head)} not applied",
    )
    cleared = poll_until(
        lambda: (workers[0].sample("projectionist_oldest_transaction_age_seconds") or 0.0) < 2.0, 15, 0.25
    )
    h.check(cleared is not None, "the oldest-transaction metric falls back after the commit")
    recovery = None if done is None else done - committed_at
    h.result.faults = f"1 transaction open {p.long_transaction:g} s"
    h.result.recovery_seconds = recovery
    h.result.recovery = "-" if recovery is None else f"{recovery:.2f} s after the commit"
    h.result.readyz = f"200 throughout; oldest-transaction metric peaked at {oldest_age:.0f} s"
    h.finish()


def rescale(h: Harness) -> None:
    """4 → 3 → 6 partitions under load: the new group starts with --rescale beside the old one."""
    p = h.profile
    old = h.group(4)
    h.warm_up(old)
    # The 4-group has no partition indexes here: its workers say so.
    unindexed = {w.name: w.sample("projectionist_partition_index_used") for w in old}
    h.check(
        all(v == 0 for v in unindexed.values()),
        "every worker of the 4-group, which has no partition indexes, reports "
        "projectionist_partition_index_used 0",
        str(unindexed),
    )
    # As the runbook allows: the new counts' partition indexes are built
    # concurrently while the 4-group runs under load, so the new groups read
    # through them, skip marks included.
    with connect(h.url, autocommit=True) as conn:
        for total in (3, 6):
            create_indexes(conn, total)
    recoveries: list[float] = []
    for total in (3, 6):
        previous = old[0].spec.total_workers
        new = h.group(total, "rescale", rescale=True)
        waiting = h.wait_state(new, "standby")
        h.check(
            waiting is not None,
            f"the {total}-group waits as standby (503) while the {previous}-group runs",
            _states(new),
        )
        time.sleep(p.rescale_phase)
        h.check(
            h.db.group_size("recorder") == previous,
            f"the projection keeps {previous} partitions while the old group runs",
        )
        codes = h.fleet.stop(old)
        stopped_at = time.monotonic()
        h.check(all(c == 0 for c in codes.values()), f"the {previous}-group stops cleanly", str(codes))
        done = h.wait_recovered(new, total)
        if not h.check(
            done is not None, f"the {total}-group takes over once the {previous}-group has stopped"
        ):
            break
        assert done is not None
        recoveries.append(done - stopped_at)
        h.check(h.db.group_size("recorder") == total, f"the projection now has {total} partitions")
        used = {w.name: w.sample("projectionist_partition_index_used") for w in new}
        h.check(
            all(v == 1 for v in used.values()),
            f"every worker of the {total}-group reports projectionist_partition_index_used 1",
            str(used),
        )
        time.sleep(p.rescale_phase)
        old = new
    h.result.faults = "4 → 3 → 6 partitions, live"
    h.result.recovery_seconds = max(recoveries, default=None)
    h.result.recovery = _seconds(recoveries, "switches") + " after the old group stopped"
    h.result.readyz = "new group 503 standby → 200 once the old one stopped"
    h.finish()
    sizes = {int(r[0]) for r in h.db.rows("SELECT DISTINCT total_workers FROM applied_events")}
    h.check(sizes == {4, 3, 6}, "each of the three groups applied events", str(sorted(sizes)))
    replayed = h.db.scalar(
        "SELECT count(*) FROM projection_checkpoints WHERE total_workers = 6 AND last_global_position = 0"
    )
    h.check(replayed == 0, "no partition of the final group started over from position 0")
    # Statistics of stopped backends are flushed when they exit.
    unused = h.db.scalar(
        "SELECT count(*) FROM pg_stat_user_indexes"
        " WHERE indexrelname ~ '^events_partition_[36]_[0-9]+_idx$' AND idx_scan = 0"
    )
    h.check(
        unused == 0,
        "every partition of the 3- and 6-groups read through its partition index",
        f"{unused} unused",
    )


def standby_takeover(h: Harness) -> None:
    """Two processes per WORKER_ID: the owner is killed with SIGKILL, the standby takes over."""
    p = h.profile
    owners = h.group(4, "owner")
    h.warm_up(owners)
    standbys = h.group(4, "standby")
    waiting = h.wait_state(standbys, "standby")
    h.check(
        waiting is not None,
        "second processes with the same WORKER_IDs report standby (503)",
        _states(standbys),
    )
    _check_standby_metrics(h, standbys)
    takeovers: list[float] = []
    for i in range(p.takeovers):
        time.sleep(p.takeover_interval)
        k = i % 4
        old_owner = h.db.owners("recorder", 4).get(k)
        killed_at = owners[k].kill9()
        standby = standbys[k]
        done = h.wait_recovered([standby], 4, {old_owner} if old_owner is not None else set(), timeout=30)
        if not h.check(done is not None, f"the standby of partition {k}/4 takes over"):
            break
        assert done is not None
        takeovers.append(done - killed_at)
        h.check(
            done - killed_at < TAKEOVER_LIMIT,
            f"takeover of {k}/4 within {TAKEOVER_LIMIT:g} s of kill -9",
            f"{done - killed_at:.2f} s",
        )
        replacement = h.fleet.spawn(WorkerSpec(k, 4), "standby")
        h.check(
            h.wait_state([replacement], "standby") is not None,
            f"the restarted process of {k}/4 becomes the new standby",
            replacement.describe(),
        )
        owners[k], standbys[k] = standby, replacement
    h.result.faults = f"owner kill -9 x{len(takeovers)}, 4 standbys"
    h.result.recovery_seconds = max(takeovers, default=None)
    h.result.recovery = _seconds(takeovers, "takeovers")
    h.result.readyz = "standby 503 → 200 on takeover"
    h.finish()


def _check_standby_metrics(h: Harness, standbys: Sequence[WorkerProcess]) -> None:
    labels = {"projection": "recorder", "total_workers": "4"}
    states = []
    for w in standbys:
        flags = {"worker": str(w.spec.worker_id), **labels}
        standby = w.sample("projectionist_worker_state", projectionist_worker_state="standby", **flags)
        owned = w.sample("projectionist_partition_owned", **flags)
        states.append((w.name, standby, owned))
    h.check(
        all(standby == 1.0 and owned == 0.0 for _, standby, owned in states),
        "their metrics say projectionist_worker_state=standby and projectionist_partition_owned 0",
        str(states),
    )


def _append_poison(h: Harness, aggregate: str) -> tuple[str, int, int]:
    """Append one event the projection cannot apply; returns (event id, txid, position)."""
    with connect(h.url, application_name="chaos:poison", autocommit=True) as conn:
        result = append(conn, aggregate, [NewEvent("Poison", {"poison": True})])
        row = conn.execute(
            "SELECT event_id::text, transaction_id::text, global_position FROM events"
            " WHERE aggregate_id = %s AND aggregate_version = %s",
            (aggregate, result.version),
        ).fetchone()
    assert row is not None
    return str(row[0]), int(row[1]), int(row[2])


_POISON_AGGREGATE = f"{AGGREGATE_PREFIX}7"


def poison_stop(h: Harness) -> None:
    """POISON_POLICY=stop: the partition stops in front of the event, not ready, until it is fixed."""
    p = h.profile
    workers = h.group(4, projection=POISON_SENSITIVE, poison_policy="stop", max_retries=2)
    h.warm_up(workers, "poison_sensitive")
    k = partition_of(_POISON_AGGREGATE, 4)
    victim, others = workers[k], [w for i, w in enumerate(workers) if i != k]
    event_id, txid, position = _append_poison(h, _POISON_AGGREGATE)
    poisoned_at = time.monotonic()
    failing = h.wait_state([victim], "failing")
    h.check(failing is not None, f"the worker of {k}/4 reports failing (503)", victim.describe(poisoned_at))
    others_before = _applied_outside(h, k)
    time.sleep(p.poison_hold)
    past = h.db.scalar(
        "SELECT count(*) FROM applied_events a JOIN events e USING (event_id)"
        " WHERE a.projection = 'poison_sensitive' AND e.partition_hash %% 4 = %s"
        " AND (e.transaction_id, e.global_position) >= (%s::text::xid8, %s)",
        (k, str(txid), position),
    )
    h.check(
        past == 0, f"nothing of partition {k}/4 at or past the poison event was applied", f"{past} applied"
    )
    h.check(
        failing is not None and not victim.saw(lambda o: o.ready, failing),
        f"the worker of {k}/4 stayed not ready while the event kept failing",
        victim.describe(poisoned_at),
    )
    h.check(_applied_outside(h, k) > others_before, "the other partitions kept processing")
    wavered = [w.name for w in others if w.saw(_not_ready, poisoned_at)]
    h.check(not wavered, "the other workers stayed ready", ", ".join(wavered))
    h.check(h.db.scalar("SELECT count(*) FROM dead_letters") == 0, "policy stop parks nothing")
    h.db.execute("CREATE TABLE poison_healed ()")  # the operator's fix
    healed_at = time.monotonic()
    done = poll_until(
        lambda: (
            victim.ready()
            and h.db.scalar("SELECT count(*) FROM applied_events WHERE event_id = %s", (event_id,)) == 1
        ),
        60,
    )
    h.check(
        done is not None,
        "after the fix the worker applies the event and is ready again",
        victim.describe(healed_at),
    )
    recovery = None if done is None else done - healed_at
    h.result.faults = "1 poison event, policy stop, fixed after " + f"{p.poison_hold:g} s"
    h.result.recovery_seconds = recovery
    h.result.recovery = "-" if recovery is None else f"{recovery:.2f} s after the fix (retry backoff)"
    h.result.readyz = f"{k}/4: 200 → 503 failing until fixed → 200; others 200"
    h.finish("poison_sensitive")


def poison_park(h: Harness) -> None:
    """POISON_POLICY=park: the event and its aggregate's later events are parked; the rest flows."""
    workers = h.group(4, projection=POISON_SENSITIVE, poison_policy="park", max_retries=2)
    h.warm_up(workers, "poison_sensitive")
    k = partition_of(_POISON_AGGREGATE, 4)
    victim = workers[k]
    event_id, _, position = _append_poison(h, _POISON_AGGREGATE)
    poisoned_at = time.monotonic()
    failing = h.wait_state([victim], "failing")
    h.check(
        failing is not None,
        f"the worker of {k}/4 reports failing (503) while it retries",
        victim.describe(poisoned_at),
    )
    back = poll_until(
        lambda: failing is not None and victim.first(lambda o: o.ready, failing) is not None, 60
    )
    h.check(
        back is not None,
        f"the worker of {k}/4 parks the event and is ready again",
        victim.describe(poisoned_at),
    )
    ready_again = victim.first(lambda o: o.ready, failing or poisoned_at)
    recovery = None if ready_again is None else ready_again.at - poisoned_at
    version = int(h.db.scalar("SELECT aggregate_version FROM events WHERE event_id = %s", (event_id,)))
    blocked = poll_until(
        lambda: (
            h.db.scalar(
                "SELECT count(*) FROM dead_letters WHERE reason = 'blocked' AND aggregate_id = %s",
                (_POISON_AGGREGATE,),
            )
            > 0
        ),
        30,
    )
    letters = h.db.rows(
        "SELECT id, aggregate_id, aggregate_version, reason, attempts, error IS NOT NULL"
        " FROM dead_letters WHERE status = 'parked' ORDER BY aggregate_id, aggregate_version"
    )
    failed = [r for r in letters if r[3] == "failed"]
    behind = [r for r in letters if r[3] == "blocked"]
    h.check(
        [(r[1], r[2], r[5]) for r in failed] == [(_POISON_AGGREGATE, version, True)]
        and failed[0][4] >= 2
        and blocked is not None
        and [(r[1], r[2]) for r in behind]
        == [(_POISON_AGGREGATE, version + 1 + i) for i in range(len(behind))],
        "the event is parked with its error, and only its aggregate's later events are parked behind it",
        f"failed: {[(r[1], r[2], r[4]) for r in failed]} (aggregate, version, attempts); "
        f"blocked: {len(behind)}, versions {[r[2] for r in behind][:3]}...{[r[2] for r in behind][-1:]}"
        f" of {sorted({r[1] for r in behind})}",
    )
    later = h.db.scalar(
        "SELECT count(*) FROM applied_events WHERE projection = 'poison_sensitive'"
        " AND aggregate_id = %s AND aggregate_version >= %s",
        (_POISON_AGGREGATE, version),
    )
    h.check(later == 0, "no event of the poisoned aggregate was applied past it", f"{later} applied")
    flowing = poll_until(
        lambda: (
            h.db.scalar(
                "SELECT count(*) FROM applied_events a JOIN events e USING (event_id)"
                " WHERE a.projection = 'poison_sensitive' AND e.partition_hash %% 4 = %s"
                " AND e.global_position > %s",
                (k, position),
            )
            > 0
        ),
        30,
    )
    h.check(flowing is not None, f"partition {k}/4 kept processing its other aggregates")
    others = [w for i, w in enumerate(workers) if i != k]
    wavered = [w.name for w in others if w.saw(_not_ready, poisoned_at)]
    h.check(not wavered, "the other workers stayed ready", ", ".join(wavered))
    parked_metric = victim.sample("projectionist_parked_events", projection="poison_sensitive")
    h.check(
        parked_metric is not None and parked_metric >= 2,
        "projectionist_parked_events counts the parked events",
        str(parked_metric),
    )
    h.db.execute("CREATE TABLE poison_healed ()")  # the operator's fix
    # The operator retries while the aggregate stays busy: its next events
    # keep being parked by batches that run concurrently with the retry.
    h.load.hot, h.load.hot_share = _POISON_AGGREGATE, 0.3
    time.sleep(0.5)
    retried = subprocess.run(
        projectionist_command("dead-letters", "retry", str(failed[0][0] if failed else 0)),
        env=child_env({"DATABASE_URL": h.url}),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    h.check(retried.returncode == 0, "`projectionist dead-letters retry` is accepted", retried.stderr.strip())
    drained = poll_until(
        lambda: h.db.scalar("SELECT count(*) FROM dead_letters WHERE status IN ('parked', 'retry')") == 0, 30
    )
    left = h.db.rows(
        "SELECT status, count(*), min(aggregate_version) FROM dead_letters"
        " WHERE status IN ('parked', 'retry') GROUP BY 1 ORDER BY 1"
    )
    h.check(
        drained is not None,
        "after the fix and one retry, every letter of the aggregate is applied and none is left open",
        f"left open (status, count, lowest version): {left}",
    )
    h.load.hot = None
    h.result.faults = "1 poison event, policy park, retried after the fix"
    h.result.recovery_seconds = recovery
    h.result.recovery = "-" if recovery is None else f"{recovery:.2f} s to park and go on"
    h.result.readyz = f"{k}/4: 200 → 503 failing while retrying → 200 parked; others 200"
    h.finish("poison_sensitive")


def _applied_outside(h: Harness, partition: int) -> int:
    return int(
        h.db.scalar(
            "SELECT count(*) FROM applied_events a JOIN events e USING (event_id)"
            " WHERE a.projection = 'poison_sensitive' AND e.partition_hash %% 4 <> %s",
            (partition,),
        )
    )


#: Every scenario, in the order the table lists them.
SCENARIOS: dict[str, Callable[[Harness], None]] = {
    "kill -9": kill_9,
    "database restart": database_restart,
    "connection drop": connection_drop,
    "long transaction": long_transaction,
    "rescale": rescale,
    "standby takeover": standby_takeover,
    "poison (stop)": poison_stop,
    "poison (park)": poison_park,
}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("--", "-")


def run_scenario(name: str, server: ChaosServer, profile: Profile, log_root: Path) -> ScenarioResult:
    """Run one scenario from a fresh database; never raises for a failed check or a crash of the run."""
    started = time.monotonic()
    sleep = _PARK_RECORDER_SLEEP if name == "poison (park)" else _RECORDER_SLEEP
    h = Harness(server, profile, slug(name), log_root, seed=len(name), recorder_sleep=sleep)
    h.result.scenario = name
    try:
        SCENARIOS[name](h)
    except Exception:
        h.result.error = traceback.format_exc(limit=8)
    finally:
        h.close()
        h.result.duration_seconds = time.monotonic() - started
    if not h.result.ok:
        h.result.logs = h.fleet.logs()
    return h.result
