"""The incidents: each fault, how to inject and remove it, and what the dashboard and alerts must say.

An :class:`Incident` names the cause the triage table must show on the
partitions it affects, the alerts that must fire (with their labels) and the
ones it may also cause; anything else that fires is a false alert. Its
:class:`Fault` injects and removes the fault and may add checks of its own.
The panels are titles of the "Projection workers" dashboard, drawn into the
incident's PNG.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from chaos.load import AGGREGATE_PREFIX
from psycopg.conninfo import make_conninfo

from incidents.lab import AGGREGATES, HOG_ROLE, PARTITIONS, PROJECTION, Stage
from projectionist.partitioning import partition_of
from projectionist.records import NewEvent
from projectionist.store.appending import append
from projectionist.store.connection import Connection, connect

PROJECTION_LABELS = {"projection": PROJECTION, "total_workers": str(PARTITIONS)}
#: Events/s while wake-ups are lost: a second or so apart on each partition,
#: far beyond a busy worker's window, so the workers sleep between them.
TRICKLE_RATE = 4.0


@dataclass(frozen=True, slots=True)
class ExpectedAlert:
    """An alert that must fire: ``labels`` must be among its labels (``{victim}`` is the partition hit).

    ``each_partition``: once per partition, with its ``worker`` label.
    ``after_removal``: it may first fire once the fault is removed (when late events are applied).
    """

    name: str
    labels: dict[str, str] = field(default_factory=dict)
    each_partition: bool = False
    after_removal: bool = False


@dataclass
class Fault:
    """What an incident does to the stage. Subclasses override :meth:`inject` and :meth:`remove`."""

    #: The partition the fault hits, when it hits one.
    victim: int | None = None
    #: Facts the fault learned, for its checks and the report (a position, a count).
    facts: dict[str, Any] = field(default_factory=dict)

    def inject(self, stage: Stage) -> None: ...

    def remove(self, stage: Stage) -> None: ...

    def done(self, stage: Stage, elapsed: float) -> bool | None:
        """``True``/``False``: hold exactly this long (fixed faults); ``None``: until it shows."""
        return None

    def checks(self, stage: Stage) -> list[tuple[bool, str, str]]:
        """(ok, what, detail) checks of the fault's own, run before it is removed."""
        return []

    def describe(self) -> str:
        return ""


@dataclass(frozen=True)
class Incident:
    slug: str
    title: str
    #: The cause the triage table must name on the affected partitions ("ok" for the control).
    cause: str
    #: "one": the fault's victim partition; "all": every partition.
    affects: str
    make_fault: Callable[[], Fault]
    required: tuple[ExpectedAlert, ...] = ()
    #: Alerts it may also cause (any labels).
    allowed: tuple[str, ...] = ()
    #: Causes the affected partitions may show on the way, besides ok, lagging and catching_up.
    also_causes: tuple[str, ...] = ()
    #: Dashboard panels for the PNG, besides the triage table, the cause over time and the lag.
    panels: tuple[str, ...] = ()
    #: In the quick subset CI runs.
    quick: bool = False

    def affected(self, victim: int | None) -> set[int]:
        if self.affects == "all":
            return set(range(PARTITIONS))
        if self.affects == "one":
            assert victim is not None
            return {victim}
        return set()


# -- the faults --------------------------------------------------------------------


class Steady(Fault):
    def done(self, stage: Stage, elapsed: float) -> bool:
        return elapsed >= stage.profile.steady

    def describe(self) -> str:
        return "steady load, no fault"


class KillWorker(Fault):
    """kill -9 of one worker, which has no standby; its supervisor restarts it once the cause shows."""

    def inject(self, stage: Stage) -> None:
        self.victim = 2
        self._process = stage.workers[self.victim]
        self.facts["instance"] = f"127.0.0.1:{self._process.port}"
        self._process.kill9()

    def remove(self, stage: Stage) -> None:
        stage.restart_worker(self._process)

    def describe(self) -> str:
        return f"kill -9 of worker {self.victim}/{PARTITIONS}, restarted once diagnosed"


_POISON_AGGREGATE = f"{AGGREGATE_PREFIX}7"


class PoisonEvent(Fault):
    """An event the projection cannot apply, under POISON_POLICY=stop; the operator's fix ends it."""

    def inject(self, stage: Stage) -> None:
        self.victim = partition_of(_POISON_AGGREGATE, PARTITIONS)
        with connect(stage.url, autocommit=True) as conn:
            result = append(conn, _POISON_AGGREGATE, [NewEvent("Poison", {"poison": True})])
            row = conn.execute(
                "SELECT global_position FROM events WHERE aggregate_id = %s AND aggregate_version = %s",
                (_POISON_AGGREGATE, result.version),
            ).fetchone()
        assert row is not None
        self.facts["position"] = int(row[0])

    def remove(self, stage: Stage) -> None:
        stage.db.execute("CREATE TABLE poison_healed ()")

    def checks(self, stage: Stage) -> list[tuple[bool, str, str]]:
        shown = stage.query_ok(
            f'max(projectionist_poison_event_position{{projection="{PROJECTION}", worker="{self.victim}"}})'
        )
        value = int(shown[0].value) if shown else None
        return [
            (
                value == self.facts["position"],
                "the table's failing-at column shows the poison event's global position",
                f"shown {value}, appended at {self.facts['position']}",
            )
        ]

    def describe(self) -> str:
        position = self.facts.get("position")
        return f"a poison event at position {position} (partition {self.victim}), POISON_POLICY=stop"


class OpenTransaction(Fault):
    """A session appends an event and leaves its transaction open, longer than the lag threshold."""

    def inject(self, stage: Stage) -> None:
        self._conn = connect(stage.url, application_name="incident:open-transaction")
        append(self._conn, "open-transaction", [NewEvent("LongTransaction", {})])

    def remove(self, stage: Stage) -> None:
        self._conn.commit()
        self._conn.close()

    def checks(self, stage: Stage) -> list[tuple[bool, str, str]]:
        busy = stage.query_ok(f'max(projectionist:partition_busy:ratio_rate1m{{projection="{PROJECTION}"}})')
        value = float(busy[0].value) if busy else 0.0
        return [
            (value < 0.5, "no worker is at fault: none is busy while every partition waits", f"{value:.2f}")
        ]

    def describe(self) -> str:
        return "an append's transaction left open past the 60 s lag threshold"


_HOT_AGGREGATE = "hot-0"


class HotAggregate(Fault):
    """One aggregate takes 70% of the transactions, at three times the ordinary rate."""

    def inject(self, stage: Stage) -> None:
        self.victim = partition_of(_HOT_AGGREGATE, PARTITIONS)
        # Larger transactions: the rate without three times the round trips.
        stage.load.events_per_transaction = (2, 6)
        stage.load.hot, stage.load.hot_share = _HOT_AGGREGATE, 0.7
        stage.load.rate = stage.profile.rate * 3

    def remove(self, stage: Stage) -> None:
        stage.load.hot, stage.load.hot_share = None, 0.0
        stage.load.rate = stage.profile.rate
        stage.load.events_per_transaction = (1, 3)

    def describe(self) -> str:
        return f"aggregate {_HOT_AGGREGATE} (partition {self.victim}) takes 70% of 3x the load"


class LockedReadModel(Fault):
    """Another session takes a SHARE lock on the read model's table for 8 s of every 9: writes wait."""

    hold = 8.0
    gap = 1.0

    def inject(self, stage: Stage) -> None:
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._pulse, args=(stage.url,), name="locker", daemon=True)
        self._thread.start()

    def _pulse(self, url: str) -> None:
        with connect(url, application_name="incident:locker") as conn:
            while not self._halt.is_set():
                # SHARE conflicts with the projection's inserts (ROW EXCLUSIVE) but takes no
                # transaction id, so it does not fence the readers: only the writes slow down.
                conn.execute("LOCK TABLE applied_events IN SHARE MODE")
                self._halt.wait(self.hold)
                conn.commit()
                self._halt.wait(self.gap)

    def remove(self, stage: Stage) -> None:
        self._halt.set()
        self._thread.join(timeout=30)

    def describe(self) -> str:
        return f"SHARE lock on the read model's table, {self.hold:g} s of every {self.hold + self.gap:g}"


class Overload(Fault):
    """Appends at 8 times the ordinary rate: beyond what the four workers can apply together."""

    def inject(self, stage: Stage) -> None:
        stage.load.events_per_transaction = (5, 15)
        stage.load.rate = stage.profile.rate * 8

    def remove(self, stage: Stage) -> None:
        stage.load.rate = stage.profile.rate
        stage.load.events_per_transaction = (1, 3)

    def describe(self) -> str:
        return "appends at 8x the ordinary rate"


class DatabaseDown(Fault):
    """PostgreSQL stopped (fast shutdown) and started again after ``downtime``."""

    def inject(self, stage: Stage) -> None:
        stage.db.close()
        stage.lab.server.stop("fast")

    def remove(self, stage: Stage) -> None:
        stage.lab.server.start()

    def done(self, stage: Stage, elapsed: float) -> bool:
        return elapsed >= stage.profile.downtime

    def checks(self, stage: Stage) -> list[tuple[bool, str, str]]:
        down = stage.query_ok("min(pg_up) == 0")
        return [(bool(down), "the PostgreSQL row's up panel shows the server down (pg_up 0)", "")]

    def describe(self) -> str:
        return "PostgreSQL stopped, then started"


class SilentAppends(Fault):
    """A trickle of appends that never send the wake-up (``notify=False``): only polling is left.

    A busy worker polls by design and needs no wake-up, so at the ordinary
    rate nothing would change. Losing them shows when events come further
    apart than a busy worker's window: the workers fall asleep between
    events and wait out their poll interval.
    """

    def inject(self, stage: Stage) -> None:
        stage.load.notify = False
        stage.load.rate = TRICKLE_RATE
        stage.trickle.paused.set()  # the API's appends would wake the workers

    def remove(self, stage: Stage) -> None:
        stage.load.notify = None
        stage.load.rate = stage.profile.rate
        stage.trickle.paused.clear()

    def describe(self) -> str:
        return f"{TRICKLE_RATE:g} events/s appended without NOTIFY"


class ConnectionHog(Fault):
    """Another client opens connections until PostgreSQL refuses it, and keeps them."""

    def inject(self, stage: Stage) -> None:
        self._conns: list[Connection] = []
        conninfo = make_conninfo(stage.url, user=HOG_ROLE)
        while len(self._conns) < 1000:
            try:
                self._conns.append(connect(conninfo, autocommit=True, application_name="incident:hog"))
            except psycopg.OperationalError as e:
                self.facts["refused"] = str(e).strip().splitlines()[0]
                break
        self.facts["held"] = len(self._conns)

    def remove(self, stage: Stage) -> None:
        for conn in self._conns:
            conn.close()

    def done(self, stage: Stage, elapsed: float) -> bool | None:
        return None

    def checks(self, stage: Stage) -> list[tuple[bool, str, str]]:
        share = stage.query_ok("sum(pg_stat_activity_count) / max(pg_settings_max_connections)")
        value = float(share[0].value) if share else 0.0
        return [
            (
                value >= 0.9,
                "the PostgreSQL row's connections panel shows the connections near max_connections",
                f"{value:.0%} in use; the client held {self.facts['held']} and was refused: "
                f"{self.facts.get('refused', '-')}",
            )
        ]

    def describe(self) -> str:
        return f"another client holds {self.facts.get('held', '?')} connections"


# -- the catalogue -------------------------------------------------------------------

_VICTIM = "{victim}"
_LATE = "ProjectionistFreshnessBudgetBurnFast"

INCIDENTS: tuple[Incident, ...] = (
    Incident(
        "steady-load",
        "steady load, no fault (the control)",
        "ok",
        "none",
        Steady,
        panels=("Events/s per worker", "Append-to-apply delay"),
        quick=True,
    ),
    Incident(
        "worker-killed",
        "a worker is killed (kill -9) and has no standby",
        "no_owner",
        "one",
        KillWorker,
        required=(
            ExpectedAlert("ProjectionistWorkerDown", {"instance": "{instance}"}),
            ExpectedAlert("ProjectionistPartitionUncovered", {**PROJECTION_LABELS, "worker": _VICTIM}),
        ),
        allowed=("ProjectionistLagHigh", "ProjectionistWorkerStalled", _LATE),
        panels=("Partition coverage", "Up"),
        quick=True,
    ),
    Incident(
        "poison-event",
        "a poison event with POISON_POLICY=stop",
        "failing_event",
        "one",
        PoisonEvent,
        required=(ExpectedAlert("ProjectionistWorkerFailing", {**PROJECTION_LABELS, "worker": _VICTIM}),),
        allowed=("ProjectionistErrorsRising", "ProjectionistLagHigh", "ProjectionistWorkerStalled", _LATE),
        panels=("Errors by type", "Worker state"),
    ),
    Incident(
        "open-transaction",
        "a transaction held open for longer than the lag threshold",
        "open_transaction",
        "all",
        OpenTransaction,
        required=(
            ExpectedAlert("ProjectionistLagHigh", dict(PROJECTION_LABELS), each_partition=True),
            ExpectedAlert(_LATE, {"projection": PROJECTION}, after_removal=True),
        ),
        allowed=("ProjectionistWorkerStalled", "ProjectionistOldestTransactionTooOld"),
        panels=("Oldest open transaction", "Budget burn rate", "Longest transaction"),
    ),
    Incident(
        "hot-partition",
        "one aggregate takes most of the appends, beyond one worker's speed",
        "hot_partition",
        "one",
        HotAggregate,
        required=(ExpectedAlert(_LATE, {"projection": PROJECTION}),),
        allowed=("ProjectionistLagHigh",),
        panels=("Events/s per worker", "Budget burn rate", "Append-to-apply delay"),
    ),
    Incident(
        "slow-apply",
        "the projection's writes slow down (a lock held on its read-model table)",
        "slow_apply",
        "all",
        LockedReadModel,
        required=(ExpectedAlert(_LATE, {"projection": PROJECTION}),),
        allowed=("ProjectionistLagHigh",),
        also_causes=("under_provisioned",),
        panels=("Batch duration percentiles", "Locks", "Errors by type"),
    ),
    Incident(
        "under-provisioned",
        "appends outrun the whole fleet's capacity",
        "under_provisioned",
        "all",
        Overload,
        required=(ExpectedAlert(_LATE, {"projection": PROJECTION}),),
        allowed=("ProjectionistLagHigh",),
        also_causes=("hot_partition",),
        panels=("Events/s in total", "Events/s per worker", "Budget burn rate"),
    ),
    Incident(
        "database-restart",
        "PostgreSQL stopped, then started",
        "database_unreachable",
        "all",
        DatabaseDown,
        required=(ExpectedAlert("ProjectionistDatabaseDown"),),
        # Once the server is back, each worker reconnects when its backoff (up to 10 s, not
        # scaled) runs out; meanwhile its partition has no owner, longer than the scaled 6 s.
        allowed=(
            "ProjectionistWorkerFailing",
            "ProjectionistErrorsRising",
            "ProjectionistPartitionUncovered",
            _LATE,
        ),
        also_causes=("no_owner",),
        panels=("PostgreSQL up", "Connections by state", "Commits and rollbacks/s", "Errors by type"),
        quick=True,
    ),
    Incident(
        "lost-wakeups",
        "wake-ups lost (appends that do not notify)",
        "polling_only",
        "all",
        SilentAppends,
        panels=("Wake-ups", "Append-to-apply delay"),
    ),
    Incident(
        "connections-exhausted",
        "database connections exhausted by another client",
        "database_saturated",
        "all",
        ConnectionHog,
        required=(ExpectedAlert("ProjectionistDatabaseConnectionsNearLimit"),),
        panels=("Connections by state", "PostgreSQL up"),
    ),
)

BY_SLUG = {incident.slug: incident for incident in INCIDENTS}


def expected_alerts(incident: Incident, fault: Fault) -> list[tuple[ExpectedAlert, dict[str, str]]]:
    """The required alerts with their labels filled in: one per partition where asked."""
    out: list[tuple[ExpectedAlert, dict[str, str]]] = []
    values = {"victim": str(fault.victim), **{k: str(v) for k, v in fault.facts.items()}}
    for expected in incident.required:
        labels = {k: v.format(**values) for k, v in expected.labels.items()}
        if expected.each_partition:
            out.extend((expected, {**labels, "worker": str(k)}) for k in range(PARTITIONS))
        else:
            out.append((expected, labels))
    return out


def select(slugs: Sequence[str] | None, *, quick: bool) -> list[Incident]:
    if slugs:
        return [BY_SLUG[s] for s in slugs]
    return [i for i in INCIDENTS if i.quick or not quick]


__all__ = [
    "AGGREGATES",
    "BY_SLUG",
    "INCIDENTS",
    "ExpectedAlert",
    "Fault",
    "Incident",
    "expected_alerts",
    "select",
]
