"""Changing the partition count under load: no event applied twice, none skipped, no replay."""

from __future__ import annotations

import random
import threading
import time

import pytest

from projectionist.consume.checkpoints import Draining, GroupConfig, register_group
from projectionist.errors import ConfigError
from projectionist.partitioning import Partition
from projectionist.records import NewEvent
from projectionist.settings import WorkerOptions
from projectionist.store.appending import append
from projectionist.store.connection import Connection, connect
from projectionist.worker.worker import Worker
from tests.projections import Recorder, applied_count, verify_exactly_once

pytestmark = [pytest.mark.integration, pytest.mark.slow]


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
    deadline = time.monotonic() + 5
    result = register_group(conn, "recorder", total, allow_rescale=True)
    while isinstance(result, Draining) and time.monotonic() < deadline:
        time.sleep(0.05)
        result = register_group(conn, "recorder", total, allow_rescale=True)
    return result


def _wait_applied(conn: Connection, at_least: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if applied_count(conn) >= at_least:
            return
        time.sleep(0.1)
    raise AssertionError(f"only {applied_count(conn)} of {at_least} events applied")


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
        deadline = time.monotonic() + 20
        while conn.execute("SELECT total_workers FROM projection_groups").fetchone() != (3,):
            assert time.monotonic() < deadline, "the 3-group never took over"
            time.sleep(0.1)
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
