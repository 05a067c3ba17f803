"""Poison events: bounded retries, then `stop` (never move past) or `park` (dead letters, order kept)."""

from __future__ import annotations

import pytest

from projectionist.consume import dead_letters
from projectionist.hooks import WorkerHooks, WorkerInfo, WorkerState
from projectionist.partitioning import Partition, fnv1a_32
from projectionist.records import NewEvent
from projectionist.settings import PoisonPolicy, WorkerOptions
from projectionist.store.appending import append
from projectionist.store.connection import Connection, connect
from projectionist.testing import wait_for
from projectionist.worker.worker import Worker
from tests.helpers import run_cli
from tests.projections import PoisonSensitive, verify_exactly_once

pytestmark = pytest.mark.integration


class States(WorkerHooks):
    def __init__(self) -> None:
        self.states: list[WorkerState] = []
        self.errors: list[str] = []

    def on_state(self, info: WorkerInfo, state: WorkerState, reason: str) -> None:
        self.states.append(state)

    def on_error(self, info: WorkerInfo, error_type: str, error: BaseException) -> None:
        self.errors.append(error_type)


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
    hooks = States()
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
    hooks = States()
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
    hooks = States()
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


# The json column takes any valid JSON, but Python's json cannot decode a
# number of more than 4300 digits or nesting past the recursion limit. Such an
# event (from a writer other than the store) used to kill the worker while it
# read the batch, before the poison policy could see it.
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
