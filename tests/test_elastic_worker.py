"""The elastic worker (worker/elastic.py) in threads: shares, moves, the lock fence, health and metrics.

Real processes under faults are the chaos suite's (chaos/elastic.py); these
tests drive the runtime in this process so they can look at every hook call.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence

import pytest
from prometheus_client import CollectorRegistry

from projectionist.consume import membership
from projectionist.consume.checkpoints import register_group
from projectionist.consume.processor import Processor
from projectionist.consume.projection import Tx
from projectionist.errors import FencedError
from projectionist.hooks import Membership, OwnershipReason, WorkerHooks, WorkerInfo, WorkerState
from projectionist.partitioning import Partition, partition_of
from projectionist.records import NewEvent, RecordedEvent
from projectionist.settings import WorkerOptions
from projectionist.store.appending import append
from projectionist.store.connection import Connection, connect
from projectionist.telemetry.health import HealthHooks
from projectionist.telemetry.metrics import MetricsHooks
from projectionist.testing import wait_for
from projectionist.worker.elastic import ElasticWorker
from tests.projections import Recorder, applied_count, load_sample, verify_exactly_once

pytestmark = pytest.mark.integration

EXACT = {"lost": 0, "duplicated": 0, "misordered": 0, "wrong_worker": 0}
OPTIONS = WorkerOptions(batch_size=100, poll_interval=0.2, rebalance_interval=0.2, max_retries=2)


class Moves(WorkerHooks):
    """Every ownership change and membership report, thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.changes: list[tuple[int, bool, str]] = []
        self.reports: list[Membership] = []

    def on_ownership(self, info: WorkerInfo, owned: bool, reason: str = "") -> None:
        with self.lock:
            self.changes.append((info.worker_id, owned, reason))

    def on_membership(self, membership: Membership) -> None:
        with self.lock:
            self.reports.append(membership)

    def count(self, reason: OwnershipReason) -> int:
        with self.lock:
            return sum(1 for _, _, r in self.changes if r == reason)


@contextlib.contextmanager
def members(
    db_url: str, *hooks: WorkerHooks, partitions: int = 16, projection: type = Recorder
) -> Iterator[list[ElasticWorker]]:
    workers = [
        ElasticWorker(db_url, projection, OPTIONS, partitions=partitions, name=f"m{i}", hooks=h)
        for i, h in enumerate(hooks)
    ]
    for w in workers:
        w.start()
    try:
        yield workers
    finally:
        for w in workers:
            w.stop()
        for w in workers:
            w.join(timeout=15)


def _owned(conn: Connection, projection: str = "recorder", partitions: int = 16) -> list[tuple[int, ...]]:
    return [m.owned for m in membership.read_membership(conn, projection, partitions).members]


def _all_applied(conn: Connection) -> bool:
    row = conn.execute("SELECT count(*) FROM events").fetchone()
    return row is not None and applied_count(conn) == row[0]


def test_members_split_the_partitions_and_apply_every_event_once(db_url: str, conn: Connection) -> None:
    load_sample(conn, 3000, 83)
    with members(db_url, Moves(), Moves()):
        wait_for(lambda: sorted(map(len, _owned(conn))) == [8, 8], "two shares of 8")
        for i in range(200):
            append(conn, f"late-{i % 17}", [NewEvent("E", {"i": i})])
        wait_for(lambda: _all_applied(conn), "every event applied")
        owned = _owned(conn)
        assert sorted(k for share in owned for k in share) == list(range(16))
    assert verify_exactly_once(conn) == EXACT


def test_a_join_moves_only_the_joiners_share_and_a_graceful_leave_only_the_leavers(
    db_url: str, conn: Connection
) -> None:
    load_sample(conn, 1000, 41)
    first, second = Moves(), Moves()
    with members(db_url, first) as (a,):
        wait_for(lambda: len(a.owned) == 16, "the first member owning all 16")
        with members(db_url, second) as (b,):
            wait_for(lambda: (len(a.owned), len(b.owned)) == (8, 8), "8 and 8 after the join")
            # The joiner took 8 and nothing else moved: 16 taken once, 8 of them given back once.
            assert first.count(OwnershipReason.REVOKED) == 8
            assert second.count(OwnershipReason.ASSIGNED) == 8
            assert first.count(OwnershipReason.ASSIGNED) == 16
        # b stopped gracefully: a takes its 8 back, and only those.
        wait_for(lambda: len(a.owned) == 16, "the first member owning all 16 again")
        assert second.count(OwnershipReason.STOPPED) == 8
        assert first.count(OwnershipReason.ASSIGNED) == 24
        assert first.count(OwnershipReason.REVOKED) == 8
        assert any(r.rebalanced for r in first.reports)
        wait_for(lambda: _all_applied(conn), "every event applied")
    assert verify_exactly_once(conn) == EXACT


def test_a_member_beyond_the_partition_count_owns_nothing_and_is_ready(db_url: str, conn: Connection) -> None:
    health = [HealthHooks(), HealthHooks(), HealthHooks()]
    with members(db_url, *health, partitions=2):
        wait_for(lambda: sorted(map(len, _owned(conn, partitions=2))) == [0, 1, 1], "shares 1, 1, 0")
        wait_for(lambda: all(h.readiness().ok for h in health), "every member ready")
        idle = next(h for h in health if not h.members()[0].owned)
        verdict = idle.readiness()
        assert verdict.workers == [] and "0 partition(s) owned" in verdict.reason
        assert verdict.as_json()["members"][0]["state"] == "live"
        assert idle.liveness().ok


def test_metrics_report_the_share_the_members_and_the_moves(db_url: str, conn: Connection) -> None:
    registry = CollectorRegistry()
    metrics = MetricsHooks(registry, version="test")
    with members(db_url, metrics, Moves()) as (a, _):
        wait_for(lambda: len(a.owned) == 8, "a share of 8")
        labels = {"projection": "recorder", "total_workers": "16"}
        wait_for(
            lambda: registry.get_sample_value("projectionist_partitions_owned", labels) == 8, "the gauge"
        )
        assert registry.get_sample_value("projectionist_partitions_target", labels) == 8
        assert registry.get_sample_value("projectionist_group_members", labels) == 2
        assert (
            registry.get_sample_value("projectionist_rebalances_total", {"projection": "recorder"}) or 0
        ) >= 1
        owned = [
            k
            for k in range(16)
            if registry.get_sample_value(
                "projectionist_partition_owned",
                {"projection": "recorder", "worker": str(k), "total_workers": "16"},
            )
            == 1
        ]
        assert tuple(owned) == a.owned
    # Stopped: every partition it owned reports 0, so the uncovered-partition alert sees it.
    assert all(
        registry.get_sample_value(
            "projectionist_partition_owned",
            {"projection": "recorder", "worker": str(k), "total_workers": "16"},
        )
        in (0.0, None)
        for k in range(16)
    )
    stopped = registry.get_sample_value(
        "projectionist_ownership_changes_total", {"projection": "recorder", "reason": "stopped"}
    )
    assert stopped == 8


class FailsOnPoison(Recorder):
    """Fails on payloads with ``poison`` for good: its partition keeps retrying."""

    name = "fails_on_poison"

    def apply_batch(self, events: Sequence[RecordedEvent], tx: Tx) -> None:
        if any(e.payload.get("poison") for e in events):
            raise ValueError("poison")
        super().apply_batch(events, tx)


def test_a_failing_partition_backs_off_alone(db_url: str, conn: Connection) -> None:
    states: list[tuple[int, WorkerState]] = []

    class States(WorkerHooks):
        def on_state(self, info: WorkerInfo, state: WorkerState, reason: str) -> None:
            states.append((info.worker_id, state))

    with members(db_url, States(), partitions=4, projection=FailsOnPoison) as (a,):
        wait_for(lambda: len(a.owned) == 4, "all 4 partitions")
        append(conn, "poisoned", [NewEvent("E", {"poison": True})])
        k = partition_of("poisoned", 4)
        wait_for(lambda: (k, WorkerState.FAILING) in states, "the poisoned partition failing")
        others = [f"fine-{i}" for i in range(40) if partition_of(f"fine-{i}", 4) != k][:10]
        for aggregate in others:
            append(conn, aggregate, [NewEvent("E", {})])
        wait_for(
            lambda: (
                conn.execute(
                    "SELECT count(*) FROM applied_events WHERE projection = 'fails_on_poison'"
                ).fetchone()
                == (len(others),)
            ),
            "the other partitions applying their events meanwhile",
        )


def test_the_lock_fence_refuses_a_checkpoint_of_a_partition_this_session_does_not_hold(
    db_url: str, conn: Connection
) -> None:
    load_sample(conn, 200, 7)
    register_group(conn, "recorder", 2)
    processor = Processor(Recorder(), Partition(0, 2), batch_size=50, lock_fence=True)
    processor.start(conn)
    with pytest.raises(FencedError, match="no longer holds the partition's ownership lock"):
        processor.run_batch(conn)
    assert applied_count(conn) == 0  # rolled back with the checkpoint
    with connect(db_url, autocommit=True) as other:
        # Held by another session: refused too.
        assert membership.try_acquire(other, "recorder", 2, [0]) == [0]
        with pytest.raises(FencedError):
            processor.run_batch(conn)
    # The other session's backend may outlive its closed connection by a moment.
    wait_for(lambda: membership.try_acquire(conn, "recorder", 2, [0]) == [0], "the lock free again")
    assert processor.run_batch(conn).applied > 0


def test_a_member_uses_one_connection_however_many_partitions_it_owns(db_url: str, conn: Connection) -> None:
    load_sample(conn, 500, 31)
    with members(db_url, Moves(), partitions=16) as (a,):
        wait_for(lambda: len(a.owned) == 16, "all 16 partitions")
        wait_for(lambda: _all_applied(conn), "every event applied")
        sessions = conn.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE application_name LIKE 'projectionist:recorder:elastic:%'"
        ).fetchone()
        assert sessions == (1,)
        # That one session holds the member lock and all 16 ownership locks.
        view = membership.read_view(conn, "recorder", 16)
        assert len(set(view.owners.values()) | set(view.members.values())) == 1
