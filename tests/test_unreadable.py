"""A created_at Python's datetime cannot hold: refused when written, handed to the poison policy when read."""

from __future__ import annotations

import httpx
import psycopg
import pytest
from prometheus_client import CollectorRegistry

from projectionist.api import ApiSettings, create_app
from projectionist.consume import dead_letters, lag, partition_indexes
from projectionist.consume.checkpoints import register_group
from projectionist.consume.processor import Processor
from projectionist.errors import ProjectionError
from projectionist.partitioning import Partition, partition_of
from projectionist.records import NewEvent, UndecodablePayload
from projectionist.settings import PoisonPolicy
from projectionist.store.appending import append
from projectionist.store.connection import Connection
from projectionist.store.streams import read_stream
from projectionist.testing import wait_until_readable
from tests.fix_api import ServedApp
from tests.projections import Recorder, drain

pytestmark = pytest.mark.integration

_CONSTRAINT = "events_created_at_in_python_range"


@pytest.mark.parametrize(
    "value", ["infinity", "-infinity", "12000-01-01 00:00:00+00", "0001-01-01 00:00:00+00"]
)
def test_the_store_refuses_a_created_at_python_cannot_load(conn: Connection, value: str) -> None:
    append(conn, "ok", [NewEvent("E", {})])
    with pytest.raises(psycopg.errors.CheckViolation, match=_CONSTRAINT):
        conn.execute("UPDATE events SET created_at = %s::timestamptz", (value,))


def _old_unreadable_row(conn: Connection, aggregate: str, version: int, value: str = "infinity") -> None:
    """A row written before migration 0005: the check is NOT VALID, so it stays."""
    conn.execute(f"ALTER TABLE events DROP CONSTRAINT {_CONSTRAINT}")
    conn.execute(
        "UPDATE events SET created_at = %s::timestamptz WHERE aggregate_id = %s AND aggregate_version = %s",
        (value, aggregate, version),
    )
    conn.execute(
        f"ALTER TABLE events ADD CONSTRAINT {_CONSTRAINT} CHECK (created_at >= '0001-01-02 00:00:00+00'"
        " AND created_at < '9999-12-31 00:00:00+00') NOT VALID"
    )


def _applied(conn: Connection) -> list[tuple[str, int]]:
    rows = conn.execute("SELECT aggregate_id, aggregate_version FROM applied_events ORDER BY seq")
    return [(r[0], r[1]) for r in rows]


# An unreadable row (psycopg's DataError while loading its batch) must not
# kill the worker on every restart at the same batch, stopping the partition
# for good before any poison policy sees the event.
# Batch sizes put the row inside a batch, and last in a full one, where the
# read-ahead looks first.
@pytest.mark.parametrize(("total_workers", "batch_size"), [(1, 5), (1, 6), (2, 2), (2, 3)])
def test_a_worker_parks_an_old_unreadable_row_and_goes_on(
    conn: Connection, total_workers: int, batch_size: int
) -> None:
    for n in range(12):
        append(conn, f"agg-{n % 4}", [NewEvent("E", {"n": n})])
    bad = "agg-1"
    _old_unreadable_row(conn, bad, 2)
    wait_until_readable(conn)
    own = Partition(partition_of(bad, total_workers), total_workers)
    processor = Processor(Recorder(), own, batch_size=batch_size, policy=PoisonPolicy.PARK)
    processor.start(conn)
    with pytest.raises(ProjectionError, match="created_at"):
        while processor.run_batch(conn).more:
            pass
    processor.run_batch(conn, isolate=True)
    drain(conn, processor)

    (failed, *blocked) = dead_letters.list_letters(conn)
    assert (failed.aggregate_id, failed.aggregate_version, failed.reason) == (bad, 2, "failed")
    assert "created_at" in (failed.error or "")
    assert [(x.aggregate_id, x.aggregate_version, x.reason) for x in blocked] == [(bad, 3, "blocked")]
    expected = [
        (f"agg-{n % 4}", n // 4 + 1)
        for n in range(12)
        if partition_of(f"agg-{n % 4}", total_workers) == own.worker_id and f"agg-{n % 4}" != bad
    ] + [(bad, 1)]
    assert sorted(_applied(conn)) == sorted(expected)


def test_a_retried_unreadable_row_is_parked_again_not_fatal(conn: Connection) -> None:
    append(conn, "a", [NewEvent("E", {})])
    _old_unreadable_row(conn, "a", 1, "20000-06-01 00:00:00+00")
    wait_until_readable(conn)
    processor = Processor(Recorder(), Partition(0, 1), policy=PoisonPolicy.PARK)
    processor.start(conn)
    processor.run_batch(conn, isolate=True)
    (letter,) = dead_letters.list_letters(conn)
    assert dead_letters.request_retry(conn, letter.id) == 1
    processor.run_batch(conn)  # reads the letter's event again by id
    (again,) = dead_letters.list_letters(conn)
    assert (again.status, again.attempts > letter.attempts) == ("parked", True)
    append(conn, "b", [NewEvent("E", {})])
    wait_until_readable(conn)
    drain(conn, processor)
    assert _applied(conn) == [("b", 1)]


def test_reading_the_stream_marks_the_event_instead_of_raising(conn: Connection) -> None:
    append(conn, "s", [NewEvent("E", {"i": 1}), NewEvent("E", {"i": 2})])
    _old_unreadable_row(conn, "s", 1)
    first, second = read_stream(conn, "s")
    assert isinstance(first.payload, UndecodablePayload)
    assert "global position 1" in str(first.payload.error)
    assert second.payload == {"i": 2}


# The API answered 422 invalid_value, blaming the client for stored data.
def test_the_api_says_which_event_cannot_be_read_and_pages_past_it(conn: Connection, db_url: str) -> None:
    append(conn, "s", [NewEvent("E", {"i": 1}), NewEvent("E", {"i": 2}), NewEvent("E", {"i": 3})])
    _old_unreadable_row(conn, "s", 2)
    # The other kind: valid JSON that Python's json refuses (over 4300 digits).
    append(conn, "big", [NewEvent("E", {})])
    conn.execute(
        "UPDATE events SET payload = %s::json WHERE aggregate_id = 'big'", ('{"n": ' + "9" * 5000 + "}",)
    )
    app = create_app(db_url, ApiSettings(), registry=CollectorRegistry())
    with ServedApp(app) as served:
        whole = httpx.get(f"{served.url}/streams/s", timeout=10)
        after = httpx.get(f"{served.url}/streams/s", params={"from_version": 3}, timeout=10)
        big = httpx.get(f"{served.url}/streams/big", timeout=10)
    assert (big.status_code, big.json()["error"]) == (500, "unreadable_event"), big.text
    assert "version 1 of this stream cannot be read" in big.json()["message"]
    assert whole.status_code == 500, whole.text
    assert whole.json()["error"] == "unreadable_event"
    assert "version 2 of this stream cannot be read" in whole.json()["message"]
    assert [e["data"] for e in after.json()["events"]] == [{"i": 3}]


def test_lag_stays_finite_and_not_negative_behind_such_a_row(conn: Connection) -> None:
    register_group(conn, "recorder", 2)
    partition_indexes.create_indexes(conn, 2)
    for n, value in enumerate(["infinity", "-infinity", "20000-01-01 00:00:00+00"]):
        append(conn, f"x{n}", [NewEvent("E", {})])
        _old_unreadable_row(conn, f"x{n}", 1, value)
        lags = lag.read_lag(conn, ["recorder"], 1000).partitions
        assert lags and all(0 <= p.lag_seconds < 1e12 for p in lags), (value, lags)
