"""Poison events: bounded retries, then `stop` (never move past) or `park` (dead letters, order kept);
the `dead-letters` commands; a projection's own database error is a poison event, not an outage."""

from __future__ import annotations

import os
from collections.abc import Sequence

import pytest

from projectionist.consume import dead_letters
from projectionist.consume.processor import Processor
from projectionist.consume.projection import Tx
from projectionist.hooks import WorkerHooks, WorkerState
from projectionist.partitioning import Partition, fnv1a_32
from projectionist.records import NewEvent, RecordedEvent
from projectionist.settings import PoisonPolicy, WorkerOptions
from projectionist.store.appending import append
from projectionist.store.connection import Connection, connect
from projectionist.testing import poll_until, wait_for, wait_until_readable
from projectionist.worker.worker import Worker
from tests.helpers import RecordingHooks, run_cli, running
from tests.projections import PoisonSensitive, Recorder, applied_count, verify_exactly_once

pytestmark = pytest.mark.integration


def _worker(db_url: str, policy: PoisonPolicy, hooks: WorkerHooks) -> Worker:
    worker = Worker(
        db_url,
        PoisonSensitive(),
        Partition(0, 1),
        WorkerOptions(poll_interval=0.1, poison_policy=policy, max_retries=2),
        hooks=hooks,
    )
    worker.retry_backoff.initial = worker.retry_backoff.maximum = 0.05
    return worker


def _load(conn: Connection) -> None:
    # a: 1 ok, 2 poison, 3 ok (must wait behind 2); b: 1..3 ok.
    append(conn, "a", [NewEvent("E", {})])
    append(conn, "b", [NewEvent("E", {})])
    append(conn, "a", [NewEvent("E", {"poison": True})])
    append(conn, "b", [NewEvent("E", {}), NewEvent("E", {})])
    append(conn, "a", [NewEvent("E", {})])


def _applied(conn: Connection) -> list[tuple[str, int]]:
    if not conn.execute("SELECT to_regclass('applied_events') IS NOT NULL").fetchone()[0]:  # type: ignore[index]
        return []
    return [
        (r[0], r[1])
        for r in conn.execute("SELECT aggregate_id, aggregate_version FROM applied_events ORDER BY seq")
    ]


def test_stop_policy_keeps_the_worker_in_front_of_the_poison_event(db_url: str) -> None:
    hooks = RecordingHooks()
    worker = _worker(db_url, PoisonPolicy.STOP, hooks)
    with connect(db_url, autocommit=True) as conn:
        _load(conn)
        worker.start()
        try:
            # Everything before the poison event is applied, nothing after it.
            wait_for(lambda: _applied(conn) == [("a", 1), ("b", 1)])
            wait_for(lambda: hooks.errors.count("poison") >= 2)
            assert worker.state is WorkerState.FAILING
            assert _applied(conn) == [("a", 1), ("b", 1)]
            checkpoint = conn.execute("SELECT last_global_position FROM projection_checkpoints").fetchone()
            poison = conn.execute(
                "SELECT global_position FROM events WHERE aggregate_id = 'a' AND aggregate_version = 2"
            ).fetchone()
            assert checkpoint is not None and poison is not None and checkpoint[0] < poison[0]
            assert dead_letters.list_letters(conn) == []

            conn.execute("CREATE TABLE poison_healed ()")  # the operator fixes the bug
            wait_for(lambda: len(_applied(conn)) == 6)
            wait_for(lambda: worker.state is WorkerState.LIVE)
        finally:
            worker.stop()
            worker.join(timeout=10)
        assert verify_exactly_once(conn, "poison_sensitive") == {
            "lost": 0,
            "duplicated": 0,
            "misordered": 0,
            "wrong_worker": 0,
        }


def test_park_policy_parks_the_aggregate_and_retry_replays_it_in_order(db_url: str) -> None:
    hooks = RecordingHooks()
    worker = _worker(db_url, PoisonPolicy.PARK, hooks)
    with connect(db_url, autocommit=True) as conn:
        _load(conn)
        worker.start()
        try:
            wait_for(lambda: sorted(_applied(conn)) == [("a", 1), ("b", 1), ("b", 2), ("b", 3)])
            letters = dead_letters.list_letters(conn)
            assert [(x.aggregate_id, x.aggregate_version, x.reason) for x in letters] == [
                ("a", 2, "failed"),
                ("a", 3, "blocked"),
            ]
            assert letters[0].attempts == 3  # two retries of the batch, then once alone
            assert "ValueError" in (letters[0].error or "")
            assert "Traceback" in (letters[0].traceback or "")
            # Later events of a parked aggregate keep queueing behind it.
            append(conn, "a", [NewEvent("E", {})])
            wait_for(lambda: len(dead_letters.list_letters(conn)) == 3)
            assert ("a", 4) not in _applied(conn)

            # The CLI sees them; a retry while still broken re-parks them.
            listing = run_cli("dead-letters", "list", db_url=db_url)
            assert listing.returncode == 0 and "failed" in listing.stdout and "blocked" in listing.stdout
            shown = run_cli("dead-letters", "show", str(letters[0].id), db_url=db_url)
            assert shown.returncode == 0 and "Traceback" in shown.stdout

            conn.execute("CREATE TABLE poison_healed ()")
            retried = run_cli("dead-letters", "retry", str(letters[0].id), db_url=db_url)
            assert retried.returncode == 0, retried.stderr
            wait_for(lambda: dead_letters.list_letters(conn) == [])
            append(conn, "a", [NewEvent("E", {})])
            wait_for(lambda: ("a", 5) in _applied(conn))
        finally:
            worker.stop()
            worker.join(timeout=10)
        assert verify_exactly_once(conn, "poison_sensitive") == {
            "lost": 0,
            "duplicated": 0,
            "misordered": 0,
            "wrong_worker": 0,
        }
        assert dead_letters.stats(conn, ["poison_sensitive"]) == {"poison_sensitive": (0, 0.0)}


def test_discard_gives_up_on_one_event_and_unknown_ids_are_errors(db_url: str) -> None:
    hooks = RecordingHooks()
    worker = _worker(db_url, PoisonPolicy.PARK, hooks)
    with connect(db_url, autocommit=True) as conn:
        append(conn, "a", [NewEvent("E", {"poison": True})])
        worker.start()
        try:
            wait_for(lambda: len(dead_letters.list_letters(conn)) == 1)
            count, age = dead_letters.stats(conn, ["poison_sensitive"])["poison_sensitive"]
            assert count == 1 and age >= 0
            (letter,) = dead_letters.list_letters(conn)
            assert run_cli("dead-letters", "discard", str(letter.id), db_url=db_url).returncode == 0
            assert dead_letters.list_letters(conn) == []
            closed = dead_letters.list_letters(conn, include_closed=True)
            assert [x.status for x in closed] == ["discarded"]
            missing = run_cli("dead-letters", "discard", "999", db_url=db_url)
            assert missing.returncode == 2 and "999" in missing.stderr
            # With the failed event discarded, the aggregate flows again.
            append(conn, "a", [NewEvent("E", {})])
            wait_for(lambda: ("a", 2) in _applied(conn))
        finally:
            worker.stop()
            worker.join(timeout=10)


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


# The json column takes any valid JSON, but Python's json cannot decode a
# number of more than 4300 digits or nesting past the recursion limit. Such an
# event (from a writer other than the store) must not kill the worker while it
# reads the batch, before the poison policy can see it.
@pytest.mark.parametrize(
    "payload_text",
    ['{"n": ' + "1" * 5000 + "}", "[" * 3000 + "]" * 3000],
    ids=["huge-integer", "deep-nesting"],
)
def test_an_event_the_reader_cannot_decode_goes_to_the_poison_policy(db_url: str, payload_text: str) -> None:
    worker = _worker(db_url, PoisonPolicy.PARK, WorkerHooks())
    with connect(db_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO events (event_id, aggregate_id, aggregate_version, partition_hash, event_type, "
            "payload) VALUES (gen_random_uuid(), 'bad', 1, %s, 'E', %s::json)",
            (fnv1a_32("bad"), payload_text),
        )
        append(conn, "good", [NewEvent("E", {})])
        worker.start()
        try:
            wait_for(lambda: ("good", 1) in _applied(conn) and dead_letters.list_letters(conn))
            assert worker.is_alive()
            assert [(x.aggregate_id, x.reason) for x in dead_letters.list_letters(conn)] == [
                ("bad", "failed")
            ]
        finally:
            worker.stop()
            worker.join(timeout=10)


# -- a database error the projection causes is the projection's, not an outage ----------------


class IndexedTitles(Recorder):
    """A read model with a btree-indexed column: a too-large value fails with SQLSTATE 54000."""

    name = "indexed_titles"

    def setup(self, conn: Connection) -> None:
        super().setup(conn)
        conn.execute("CREATE TABLE IF NOT EXISTS titles (aggregate_id text, title text)")
        conn.execute("CREATE INDEX IF NOT EXISTS titles_title_idx ON titles (title)")

    def apply_batch(self, events: Sequence[RecordedEvent], tx: Tx) -> None:
        for e in events:
            tx.execute("INSERT INTO titles VALUES (%s, %s)", (e.aggregate_id, e.payload.get("title", "")))
        super().apply_batch(events, tx)


def test_a_poison_event_failing_with_a_database_error_is_parked(db_url: str) -> None:
    # psycopg's OperationalError also covers errors a projection's own statement
    # causes (an index row too large, statement_timeout, a deadlock). Taken for a lost
    # connection, such an event would never be isolated or parked: the worker would
    # reconnect forever, reporting "database unavailable".
    hooks = RecordingHooks()
    worker = Worker(
        db_url,
        IndexedTitles(),
        Partition(0, 1),
        WorkerOptions(poll_interval=0.1, poison_policy=PoisonPolicy.PARK, max_retries=1),
        hooks=hooks,
    )
    worker.retry_backoff.initial = worker.retry_backoff.maximum = 0.05
    with connect(db_url, autocommit=True) as conn, running(worker):
        append(conn, "a", [NewEvent("E", {"title": "fine"})])
        append(conn, "p", [NewEvent("E", {"title": os.urandom(6000).hex()})])  # the poison event
        append(conn, "b", [NewEvent("E", {"title": "fine too"})])
        parked = poll_until(lambda: len(dead_letters.list_letters(conn)) == 1, timeout=10) is not None
        kinds = sorted(set(hooks.errors))
        causes = sorted({type(e).__name__ for e in hooks.raised})
        assert parked, f"never parked; error types {kinds}, errors {causes}, state {worker.state.value}"
        assert applied_count(conn) == 2
