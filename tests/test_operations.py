"""Operator commands at their edges: rebuild with letters queued for retry and its poison
policy, rescale under live or starting old workers, lag after a rescale, status of an unknown
projection, retrying a closed dead letter."""

from __future__ import annotations

import pytest

from projectionist.consume import dead_letters
from projectionist.consume.checkpoints import GroupConfig, register_group
from projectionist.consume.ownership import TRY_LOCK, group_key
from projectionist.consume.processor import Processor
from projectionist.consume.status import read_status
from projectionist.errors import FencedError, ProjectionError
from projectionist.partitioning import Partition
from projectionist.records import NewEvent
from projectionist.settings import PoisonPolicy
from projectionist.store.appending import append
from projectionist.store.connection import connect
from projectionist.testing import wait_until_readable
from tests.helpers import run_cli
from tests.projections import (
    PoisonSensitive,
    Recorder,
    applied_count,
    drain,
    load_sample,
    verify_exactly_once,
)

pytestmark = pytest.mark.integration


# Letters queued for retry describe the old read model: left in place, the
# replay applied them before reaching their aggregate's earlier events, then again.
def test_rebuild_with_a_queued_retry_applies_each_event_once_in_order(db_url: str) -> None:
    with connect(db_url, autocommit=True) as conn:
        append(conn, "a", [NewEvent("E", {})])
        append(conn, "a", [NewEvent("E", {"poison": True})])
        append(conn, "a", [NewEvent("E", {})])
        register_group(conn, "poison_sensitive", 1)
        wait_until_readable(conn)
        processor = Processor(PoisonSensitive(), Partition(0, 1), policy=PoisonPolicy.PARK)
        processor.start(conn)
        with pytest.raises(ProjectionError):
            processor.run_batch(conn)
        processor.run_batch(conn, isolate=True)  # parks a2 (failed) and a3 (blocked)
        letters = dead_letters.list_letters(conn)
        assert [(x.aggregate_version, x.reason) for x in letters] == [(2, "failed"), (3, "blocked")]
        conn.execute("CREATE TABLE poison_healed ()")  # the operator fixes the bug
        assert dead_letters.request_retry(conn, letters[0].id) == 2  # workers are stopped
        result = run_cli(
            "rebuild",
            "--projection",
            "tests.projections:PoisonSensitive",
            "--timeout",
            "30",
            db_url=db_url,
            timeout=90,
        )
        assert result.returncode == 0, result.stderr
        assert verify_exactly_once(conn, "poison_sensitive") == {
            "lost": 0,
            "duplicated": 0,
            "misordered": 0,
            "wrong_worker": 0,
        }


# Events the old group already applied (skip marks) are not lag.
def test_status_lag_after_rescale_counts_only_unapplied_events(db_url: str) -> None:
    with connect(db_url, autocommit=True) as conn:
        load_sample(conn, 400, 20)
        register_group(conn, "recorder", 2)
        p0 = Processor(Recorder(), Partition(0, 2), batch_size=50)
        p0.start(conn)
        drain(conn, p0)
        p1 = Processor(Recorder(), Partition(1, 2), batch_size=5)
        p1.start(conn)
        p1.run_batch(conn)  # partition 1 stops after 5 events
        applied_before = applied_count(conn)
        switched = register_group(conn, "recorder", 1, allow_rescale=True)
        assert isinstance(switched, GroupConfig) and switched.layers

        reported = read_status(conn, "recorder").workers
        assert [(w.worker_id, w.total_workers) for w in reported] == [(0, 1)]

        # What is really left to apply: run the new group to the end.
        new = Processor(Recorder(), Partition(0, 1), batch_size=50)
        new.start(conn, switched.layers)
        drain(conn, new)
        really_unapplied = applied_count(conn) - applied_before
        assert verify_exactly_once(conn)["duplicated"] == 0
        assert reported[0].lag_events == really_unapplied


# rescale waits for the old group's workers to stop, even while their checkpoints are at 0.
def test_rescale_refuses_while_old_group_workers_are_live(db_url: str) -> None:
    with connect(db_url, autocommit=True) as conn, connect(db_url, autocommit=True) as holder:
        register_group(conn, "recorder", 2)
        for k in range(2):  # two live old-group workers (their ownership locks)
            assert holder.execute(TRY_LOCK, (group_key("recorder", 2), k)).fetchone() == (True,)
        result = run_cli(
            "rescale", "--projection-name", "recorder", "--partitions", "3", "--timeout", "1", db_url=db_url
        )
        group = conn.execute("SELECT total_workers FROM projection_groups").fetchone()
        assert result.returncode != 0, result.stdout
        assert group == (2,)


def test_status_of_an_unknown_projection_is_an_error(db_url: str) -> None:
    with connect(db_url, autocommit=True) as conn:
        register_group(conn, "recorder", 1)
        Processor(Recorder(), Partition(0, 1)).start(conn)
    result = run_cli("status", "--projection-name", "recorderr", db_url=db_url)
    assert result.returncode == 2, result.stdout
    assert "recorderr" in result.stderr


def test_retry_of_a_discarded_letter_is_an_error(db_url: str) -> None:
    with connect(db_url, autocommit=True) as conn:
        append(conn, "a", [NewEvent("E", {"poison": True})])
        wait_until_readable(conn)
        processor = Processor(PoisonSensitive(), Partition(0, 1), policy=PoisonPolicy.PARK)
        processor.start(conn)
        processor.run_batch(conn, isolate=True)
        (letter,) = dead_letters.list_letters(conn)
        dead_letters.discard(conn, letter.id)
    result = run_cli("dead-letters", "retry", str(letter.id), db_url=db_url)
    assert result.returncode != 0, result.stdout


# rebuild's own workers run with the configured POISON_POLICY and MAX_RETRIES.
def test_rebuild_honours_the_configured_poison_policy(db_url: str) -> None:
    with connect(db_url, autocommit=True) as conn:
        append(conn, "a", [NewEvent("E", {})])
        append(conn, "b", [NewEvent("E", {"poison": True})])
        append(conn, "c", [NewEvent("E", {})])
    result = run_cli(
        "rebuild",
        "--projection",
        "tests.projections:PoisonSensitive",
        "--timeout",
        "20",
        db_url=db_url,
        env={"POISON_POLICY": "park", "MAX_RETRIES": "1"},
        timeout=90,
    )
    assert result.returncode == 0, result.stderr
    with connect(db_url, autocommit=True) as conn:
        assert [(x.aggregate_id, x.reason) for x in dead_letters.list_letters(conn)] == [("b", "failed")]


# A rebuild whose own workers die reports why at once, instead of watching a
# lag that can no longer fall until its --timeout runs out.
def test_rebuild_stops_when_its_workers_die(db_url: str) -> None:
    with connect(db_url, autocommit=True) as conn:
        append(conn, "a", [NewEvent("E", {})])
    result = run_cli(
        "rebuild",
        "--projection",
        "tests.projections:SetupFailsInWorkers",
        "--timeout",
        "600",
        db_url=db_url,
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    assert (
        "rebuilding 'setup_fails_in_workers' failed: worker 0/1 stopped: "
        "ConfigError: this projection's setup fails in every worker"
    ) in result.stderr
    assert "Traceback" not in result.stderr


# A rescale while an old-group worker is starting: the worker must not recreate its
# deleted checkpoint row and apply its partition next to the new group.
def test_rescale_under_a_starting_old_worker_never_applies_an_event_twice(db_url: str) -> None:
    with connect(db_url, autocommit=True) as conn, connect(db_url, autocommit=True) as holder:
        load_sample(conn, 200, 20)
        assert isinstance(register_group(conn, "recorder", 2), GroupConfig)  # worker 0/2 joined...
        for k in range(2):  # ...and the group's workers hold their ownership locks
            assert holder.execute(TRY_LOCK, (group_key("recorder", 2), k)).fetchone() == (True,)
        # The operator rescales before the old workers committed their first batch.
        run_cli(
            "rescale", "--projection-name", "recorder", "--partitions", "3", "--timeout", "1", db_url=db_url
        )
        # Worker 0/2 carries on with its start-up: loads its checkpoint and processes.
        old = Processor(Recorder(), Partition(0, 2), batch_size=50)
        old.start(conn)  # the rescale waited, so the old group is still the group
        drain(conn, old)
        holder.execute("SELECT pg_advisory_unlock_all()")
        joined = register_group(conn, "recorder", 3, allow_rescale=True)
        assert isinstance(joined, GroupConfig)
        for k in range(3):
            new = Processor(Recorder(), Partition(k, 3), batch_size=50)
            new.start(conn, joined.layers)
            drain(conn, new)
        assert verify_exactly_once(conn) == {"lost": 0, "duplicated": 0, "misordered": 0, "wrong_worker": 0}


# The same race through the worker path: a worker with a new count (no --rescale) switches
# a group that has processed nothing while an old worker is between joining and loading.
def test_old_worker_cannot_recreate_its_checkpoint_after_a_switch(db_url: str) -> None:
    with connect(db_url, autocommit=True) as conn:
        load_sample(conn, 200, 20)
        assert isinstance(register_group(conn, "recorder", 2), GroupConfig)  # old worker 0/2 joined
        joined = register_group(conn, "recorder", 3)  # a 3-worker starts: "switch at once"
        assert isinstance(joined, GroupConfig)
        old = Processor(Recorder(), Partition(0, 2), batch_size=50)
        with pytest.raises(FencedError):
            old.start(conn)  # the old worker's start-up continues, and is refused
        for k in range(3):
            new = Processor(Recorder(), Partition(k, 3), batch_size=50)
            new.start(conn, joined.layers)
            drain(conn, new)
        assert verify_exactly_once(conn) == {"lost": 0, "duplicated": 0, "misordered": 0, "wrong_worker": 0}
