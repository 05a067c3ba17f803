"""Changing the partition count: under load no event is applied twice, none skipped, none replayed;
old-group workers, live or starting, are waited for or refused; lag after a switch is what is left."""

from __future__ import annotations

import random
import threading
import time

import pytest

from projectionist.consume.checkpoints import Draining, GroupConfig, register_group
from projectionist.consume.ownership import TRY_LOCK, group_key
from projectionist.consume.processor import Processor
from projectionist.consume.status import read_status
from projectionist.errors import ConfigError, FencedError
from projectionist.partitioning import Partition
from projectionist.records import NewEvent
from projectionist.settings import WorkerOptions
from projectionist.store.appending import append
from projectionist.store.connection import Connection, connect
from projectionist.testing import poll_until, wait_for
from projectionist.worker.worker import Worker
from tests.helpers import run_cli
from tests.projections import Recorder, applied_count, drain, load_sample, verify_exactly_once

pytestmark = pytest.mark.integration


class Appender(threading.Thread):
    """Steady background load: small appends to 60 aggregates until stopped."""

    def __init__(self, db_url: str) -> None:
        super().__init__(daemon=True)
        self.db_url = db_url
        self.halt = threading.Event()
        self.appended = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        rng = random.Random(3)
        try:
            with connect(self.db_url, autocommit=True) as conn:
                while not self.halt.is_set():
                    n = rng.randint(1, 4)
                    append(conn, f"agg-{rng.randrange(60)}", [NewEvent("E", {"i": i}) for i in range(n)])
                    self.appended += n
                    time.sleep(0.003)
        except BaseException as e:  # reported by the test
            self.error = e


def _group(db_url: str, total: int, *, allow_rescale: bool = False) -> list[Worker]:
    workers = [
        Worker(
            db_url,
            Recorder(),
            Partition(k, total),
            WorkerOptions(batch_size=50, poll_interval=0.2, rescale=allow_rescale),
        )
        for k in range(total)
    ]
    for w in workers:
        w.start()
    return workers


def _stop(workers: list[Worker]) -> None:
    for w in workers:
        w.stop()
    for w in workers:
        w.join(timeout=15)


def _stop_staggered(conn: Connection, workers: list[Worker]) -> None:
    _stop(workers[:1])
    _wait_applied(conn, applied_count(conn) + 200)
    _stop(workers[1:])


def _switch_once_stopped(conn: Connection, total: int) -> GroupConfig | Draining:
    """register_group with allow_rescale, after the old group's workers were stopped.

    A stopped worker's session lock goes when its backend exits, a moment
    after the client closed the connection: allow for that, not more.
    """
    results: list[GroupConfig | Draining] = []

    def switched() -> bool:
        results.append(register_group(conn, "recorder", total, allow_rescale=True))
        return not isinstance(results[-1], Draining)

    poll_until(switched, timeout=5)
    return results[-1]


def _wait_applied(conn: Connection, at_least: int, timeout: float = 60) -> None:
    if poll_until(lambda: applied_count(conn) >= at_least, timeout, interval=0.1) is None:
        raise AssertionError(f"only {applied_count(conn)} of {at_least} events applied")


@pytest.mark.slow
def test_rescale_4_to_3_live_then_to_6_offline_under_load(db_url: str) -> None:
    load = Appender(db_url)
    load.start()
    started: list[Worker] = []
    try:
        _rescale_4_3_6(db_url, load, started)
    finally:
        load.halt.set()
        _stop(started)


def _rescale_4_3_6(db_url: str, load: Appender, started: list[Worker]) -> None:
    with connect(db_url, autocommit=True) as conn:
        four = _group(db_url, 4)
        started += four
        _wait_applied(conn, 300)

        # Live: start the 3-group while the 4-group runs. It waits for the old
        # group to stop, then switches with the old checkpoints as skip marks.
        three = _group(db_url, 3, allow_rescale=True)
        started += three
        time.sleep(1.0)
        group = conn.execute("SELECT total_workers FROM projection_groups").fetchone()
        assert group == (4,), "the new group must not switch while the old one runs"
        # Stop one old worker first so the old checkpoints end far apart: the
        # new group then starts at the lowest and must skip, event by event,
        # what the other old partitions had already applied.
        _stop_staggered(conn, four)
        wait_for(
            lambda: conn.execute("SELECT total_workers FROM projection_groups").fetchone() == (3,),
            "the 3-group to take over",
            timeout=20,
            interval=0.1,
        )
        _wait_applied(conn, applied_count(conn) + 300)

        # Documented offline procedure: stop the old group, then switch to 6.
        _stop_staggered(conn, three)
        with pytest.raises(ConfigError, match="projectionist rescale"):
            register_group(conn, "recorder", 6)
        switched = _switch_once_stopped(conn, 6)
        assert isinstance(switched, GroupConfig) and switched.generation == 3, switched
        start = conn.execute(
            "SELECT min(last_global_position) FROM projection_checkpoints WHERE total_workers = 6"
        ).fetchone()
        assert start is not None and start[0] > 0, "a rescale must not replay from position 0"
        six = _group(db_url, 6)
        started += six
        _wait_applied(conn, applied_count(conn) + 300)

        load.halt.set()
        load.join(timeout=10)
        assert load.error is None
        total = conn.execute("SELECT count(*) FROM events").fetchone()
        assert total is not None
        _wait_applied(conn, total[0])
        time.sleep(0.5)  # a double application, if any, would land now
        _stop(six)
        result = verify_exactly_once(conn)
        by_total = dict(
            conn.execute("SELECT total_workers, count(*) FROM applied_events GROUP BY 1").fetchall()
        )
    assert result == {"lost": 0, "duplicated": 0, "misordered": 0, "wrong_worker": 0}
    assert set(by_total) == {4, 3, 6}, by_total


@pytest.mark.slow
def test_old_group_worker_is_refused_after_the_switch(db_url: str) -> None:
    with connect(db_url, autocommit=True) as conn:
        append(conn, "a", [NewEvent("E", {})])
        two = _group(db_url, 2)
        try:
            _wait_applied(conn, 1)
            assert isinstance(register_group(conn, "recorder", 3, allow_rescale=True), Draining)
        finally:
            _stop(two)
        joined = _switch_once_stopped(conn, 3)
        assert isinstance(joined, GroupConfig), joined
        with pytest.raises(
            ConfigError,
            match=r"partition count 2 \(PARTITIONS or TOTAL_WORKERS\) differs from the 3 partitions",
        ):
            register_group(conn, "recorder", 2)


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
