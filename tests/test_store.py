"""Append with optimistic concurrency, bulk appends, caller transactions."""

from __future__ import annotations

import asyncio
import threading
import time

import psycopg
import pytest

from projectionist import ANY, NO_STREAM, ConcurrencyError, NewEvent, StreamAppend
from projectionist.partitioning import fnv1a_32
from projectionist.store import appending as append_module
from projectionist.store.appending import append, append_many, append_many_async
from projectionist.store.connection import Connection, connect
from projectionist.store.streams import head_position, read_stream, stream_version

pytestmark = pytest.mark.integration


def ev(n: int = 0) -> NewEvent:
    return NewEvent("Happened", {"n": n})


def test_append_assigns_versions_and_positions(conn: Connection) -> None:
    result = append(conn, "order-1", [ev(1), ev(2)], expected_version=NO_STREAM)
    assert result.version == 2
    assert len(result.global_positions) == 2
    assert result.global_positions[0] < result.global_positions[1]
    stored = read_stream(conn, "order-1")
    assert [e.aggregate_version for e in stored] == [1, 2]
    assert [e.payload["n"] for e in stored] == [1, 2]
    assert head_position(conn) == result.global_positions[-1]
    row = conn.execute("SELECT DISTINCT partition_hash FROM events").fetchall()
    assert row == [(fnv1a_32("order-1"),)]


def test_exact_expected_version(conn: Connection) -> None:
    append(conn, "a", [ev()], expected_version=0)
    append(conn, "a", [ev()], expected_version=1)
    with pytest.raises(ConcurrencyError) as info:
        append(conn, "a", [ev()], expected_version=1)
    assert info.value.actual == 2
    # Ahead of the stream is a conflict too, not a gap in versions.
    with pytest.raises(ConcurrencyError):
        append(conn, "a", [ev()], expected_version=5)
    assert stream_version(conn, "a") == 2


def test_no_stream_conflicts_when_stream_exists(conn: Connection) -> None:
    append(conn, "a", [ev()])
    with pytest.raises(ConcurrencyError):
        append(conn, "a", [ev()], expected_version=NO_STREAM)


def test_append_many_is_all_or_nothing(conn: Connection) -> None:
    append(conn, "b", [ev()])
    with pytest.raises(ConcurrencyError):
        append_many(
            conn,
            [StreamAppend("a", [ev(), ev()], NO_STREAM), StreamAppend("b", [ev()], NO_STREAM)],
        )
    assert stream_version(conn, "a") == 0
    results = append_many(conn, [StreamAppend("a", [ev(), ev()]), StreamAppend("b", [ev()], 1)])
    assert [(r.aggregate_id, r.version) for r in results] == [("a", 2), ("b", 2)]


def test_append_joins_the_callers_transaction(conn: Connection) -> None:
    conn.execute("CREATE TABLE side (x int)")
    with pytest.raises(RuntimeError), conn.transaction():
        conn.execute("INSERT INTO side VALUES (1)")
        append(conn, "a", [ev()])
        raise RuntimeError("caller aborts")
    assert stream_version(conn, "a") == 0
    with conn.transaction():
        append(conn, "a", [ev()])
        conn.execute("INSERT INTO side VALUES (2)")
    assert stream_version(conn, "a") == 1
    assert conn.execute("SELECT x FROM side").fetchall() == [(2,)]


def test_conflict_inside_callers_transaction_keeps_it_usable(conn: Connection) -> None:
    append(conn, "a", [ev()])
    with conn.transaction():
        with pytest.raises(ConcurrencyError):
            append(conn, "a", [ev()], expected_version=NO_STREAM)
        append(conn, "other", [ev()])  # the savepoint rolled back only the failed append
    assert stream_version(conn, "other") == 1


# One event and several take different one-statement paths (scalar vs arrays).
@pytest.mark.parametrize("per_append", [1, 3])
def test_concurrent_any_appends_never_lose_or_duplicate_versions(db_url: str, per_append: int) -> None:
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            with connect(db_url, autocommit=True) as c:
                for i in range(25):
                    append(c, "hot", [ev(i) for _ in range(per_append)], expected_version=ANY)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=writer) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with connect(db_url) as c:
        versions = [
            r[0]
            for r in c.execute("SELECT aggregate_version FROM events WHERE aggregate_id = 'hot' ORDER BY 1")
        ]
    assert versions == list(range(1, 150 * per_append + 1))


def _hold_append_open(db_url: str, aggregate: str, ready: threading.Event, seconds: float = 0.5) -> None:
    """An ANY append to ``aggregate`` left uncommitted for ``seconds``: it holds the stream's lock."""
    with connect(db_url, autocommit=True) as other, other.transaction():
        append(other, aggregate, [ev(99)])
        ready.set()
        time.sleep(seconds)


# A bulk append with an exact version gets one attempt, so its ANY streams
# must wait for a busy stream's lock, never report a conflict ANY cannot have.
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_bulk_append_mixing_any_and_exact_waits_for_a_busy_any_stream(db_url: str, mode: str) -> None:
    async def append_async() -> list[int]:
        async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as aconn:
            return [r.version for r in await append_many_async(aconn, appends)]

    appends = [StreamAppend("hot", [ev(1)], ANY), StreamAppend("fresh", [ev(2)], NO_STREAM)]
    ready = threading.Event()
    holder = threading.Thread(target=_hold_append_open, args=(db_url, "hot", ready))
    holder.start()
    try:
        assert ready.wait(10)
        if mode == "sync":
            with connect(db_url, autocommit=True) as c:
                versions = [r.version for r in append_many(c, appends)]
        else:
            versions = asyncio.run(append_async())
    finally:
        holder.join()
    assert versions == [2, 1]


@pytest.mark.parametrize("per_append", [1, 3])
def test_exact_version_race_has_one_winner(db_url: str, per_append: int) -> None:
    with connect(db_url, autocommit=True) as c:
        append(c, "race", [ev()])
    outcomes: list[str] = []
    barrier = threading.Barrier(5)

    def writer() -> None:
        with connect(db_url, autocommit=True) as c:
            barrier.wait()
            try:
                append(c, "race", [ev(n) for n in range(per_append)], expected_version=1)
                outcomes.append("ok")
            except ConcurrencyError:
                outcomes.append("conflict")

    threads = [threading.Thread(target=writer) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["conflict"] * 4 + ["ok"]


def test_bulk_appends_crossing_on_exact_versions_end_in_a_conflict_not_a_deadlock_error(db_url: str) -> None:
    # Two bulk appends that expect the same versions of two streams, in
    # opposite orders, wait on each other's index entries; PostgreSQL aborts
    # one of them. The caller must see what it is: a ConcurrencyError.
    with connect(db_url, autocommit=True) as c:
        c.execute(f"ALTER DATABASE \"{c.info.dbname}\" SET deadlock_timeout = '20ms'")
    rounds = 10
    outcomes: list[list[str]] = [[] for _ in range(rounds)]
    barrier = threading.Barrier(2)

    def writer(reverse: bool) -> None:
        with connect(db_url, autocommit=True) as c:
            for i in range(rounds):
                # Many events each, so that the two statements overlap.
                pair = [StreamAppend(f"{s}{i}", [ev(n) for n in range(200)], NO_STREAM) for s in "ab"]
                barrier.wait()
                try:
                    append_many(c, pair[::-1] if reverse else pair)
                    outcomes[i].append("ok")
                except ConcurrencyError:
                    outcomes[i].append("conflict")
                except psycopg.Error as e:
                    outcomes[i].append(type(e).__name__)

    threads = [threading.Thread(target=writer, args=(r,)) for r in (False, True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [sorted(o) for o in outcomes] == [["conflict", "ok"]] * rounds


def test_a_unique_violation_names_the_stream_whose_version_was_taken(conn: Connection) -> None:
    # An id may contain ", ", so "a" must not be taken for "a, 1" in the error's key.
    append(conn, "a, 1", [ev()])
    appends = [StreamAppend("a", [ev()]), StreamAppend("a, 1", [ev()])]
    with pytest.raises(psycopg.errors.UniqueViolation) as raised:
        conn.execute(
            "INSERT INTO events (event_id, aggregate_id, aggregate_version, partition_hash, event_type, "
            "payload) VALUES (gen_random_uuid(), 'a, 1', 1, 0, 'E', '{}')"
        )
    assert append_module._conflicting_aggregate(raised.value, appends) == "a, 1"


def test_older_caller_transaction_cannot_append_behind_a_newer_one(db_url: str) -> None:
    # The caller's transaction takes its id first (by writing elsewhere), then
    # another transaction appends to the stream and commits. Appending now
    # would sort before that append in the readers' order, so it is refused.
    with connect(db_url, autocommit=True) as setup:
        setup.execute("CREATE TABLE side (x int)")
    with connect(db_url) as older, connect(db_url, autocommit=True) as newer:
        older.execute("INSERT INTO side VALUES (1)")
        append(newer, "s", [ev()])
        with pytest.raises(ConcurrencyError, match="retry in a new transaction"):
            append(older, "s", [ev()])
        older.rollback()
        append(older, "s", [ev()])
        older.commit()


@pytest.mark.parametrize("bad", ["", "x" * 256, "tab\there", "nul\x00", "del\x7f", "us\x1f", "end\n"])
def test_bad_aggregate_ids_are_rejected(conn: Connection, bad: str) -> None:
    with pytest.raises(ValueError):
        append(conn, bad, [ev()])
    assert head_position(conn) == 0


def test_metadata_keeps_correlation_and_causation(conn: Connection) -> None:
    append(conn, "m", [NewEvent("E", {}, {"user": "u1"})], correlation_id="c-1", causation_id="k-1")
    (stored,) = read_stream(conn, "m")
    assert stored.metadata == {"user": "u1", "correlation_id": "c-1", "causation_id": "k-1"}
