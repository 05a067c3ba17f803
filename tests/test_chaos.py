"""The fault-injection suite, trimmed for CI: every scenario of ``make chaos`` with short timings.

Each scenario runs real ``projectionist worker`` processes against the
suite's own embedded PostgreSQL (the database-restart scenario stops and
starts it) while an append load runs; see ``chaos/scenarios.py`` for what
each one injects and checks. A failure prints every check, the reference-fold
counts and the workers' logs.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from chaos import CI, SCENARIOS, ChaosServer, ScenarioResult, render_table, run_scenario
from chaos.checks import Db, Fold
from chaos.fleet import WorkerProcess, WorkerSpec
from chaos.report import Check

from projectionist.consume import dead_letters
from projectionist.partitioning import Partition, fnv1a_32
from projectionist.records import NewEvent
from projectionist.store.appending import append
from projectionist.store.connection import connect
from projectionist.store.streams import read_stream
from tests.projections import Recorder


@pytest.fixture(scope="module")
def chaos_server() -> Iterator[ChaosServer]:
    server = ChaosServer()
    server.start()
    try:
        yield server
    finally:
        server.destroy()
        shutil.rmtree(server.base_dir, ignore_errors=True)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(150)
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario_keeps_the_read_model_exact_and_recovers(
    name: str, chaos_server: ChaosServer, tmp_path: Path
) -> None:
    result = run_scenario(name, chaos_server, CI, tmp_path)
    assert result.ok, result.explain()
    assert result.fold is not None and result.fold.events > 500, "the load must have run"
    assert result.recovery_seconds is not None, result.explain()
    assert result.faults and result.readyz


@pytest.mark.integration
def test_the_fold_check_counts_loss_duplicates_and_disorder(db_url: str) -> None:
    """The check every scenario ends with must be able to fail."""
    with connect(db_url, autocommit=True) as conn:
        for _ in range(3):
            append(conn, "a", [NewEvent("E", {})])
        Recorder().setup(conn)
        rows = conn.execute(
            "SELECT event_id, aggregate_version, global_position FROM events ORDER BY 2"
        ).fetchall()

        def record(event_id: uuid.UUID, version: int, position: int) -> None:
            conn.execute(
                "INSERT INTO applied_events (projection, event_id, aggregate_id, aggregate_version,"
                " global_position, worker_id, total_workers) VALUES ('recorder', %s, 'a', %s, %s, 0, 1)",
                (event_id, version, position),
            )

        db = Db(db_url)
        try:
            record(*rows[0])
            assert db.fold("recorder") == Fold(events=3, lost=2, duplicated=0, misordered=0, wrong_worker=0)
            record(*rows[2])  # version 3 right after version 1: out of order
            record(*rows[2])  # and applied twice
            record(*rows[1])
            fold = db.fold("recorder")
            assert (fold.lost, fold.duplicated, fold.misordered) == (0, 1, 3)
            assert not fold.exact
            assert db.unapplied("recorder") == 0
        finally:
            db.close()


def test_the_report_table_has_faults_counts_and_recovery_time() -> None:
    passed = ScenarioResult(
        "kill -9",
        faults="kill -9 x3",
        fold=Fold(events=1234, lost=0, duplicated=0, misordered=0, wrong_worker=0),
        recovery_seconds=0.5,
        recovery="max 0.50 s",
        readyz="200",
        checks=[Check("recovers", True)],
    )
    failed = ScenarioResult("rescale", fold=Fold(10, 1, 0, 0, 0), checks=[Check("takes over", False, "no")])
    table = render_table([passed, failed]).splitlines()
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header[:4] == ["scenario", "faults injected", "events", "lost"]
    assert {"duplicated", "recovery time", "result"} <= set(header)
    assert "| kill -9 | kill -9 x3 | 1,234 | 0 | 0 | 0 | max 0.50 s |" in table[2]
    assert table[3].endswith("| FAIL |")
    assert not failed.ok and "FAIL takes over: no" in failed.explain()


@pytest.mark.integration
def test_a_retry_that_meets_a_parking_batch_retries_the_letter_that_batch_parked(db_url: str) -> None:
    """A retry racing a batch (as in the poison (park) scenario) must not strand the aggregate.

    The batch locks the partition's open letters and parks the aggregate's next
    event; the operator's retry waits for it. Were the retry to update only the
    letters of its own, older snapshot, the new one would stay 'parked': a partly
    retried aggregate is never retried, and every later event of it is parked.
    """
    with connect(db_url, autocommit=True) as conn:
        append(conn, "a", [NewEvent("E", {}), NewEvent("E", {})])
        first, second = read_stream(conn, "a")
        dead_letters.park(conn, "p", first, fnv1a_32("a"), error=ValueError("boom"), attempts=3)
        (letter,) = dead_letters.list_letters(conn)
        with connect(db_url) as batch:  # what Processor.run_batch does, held open
            dead_letters.open_letters(batch, "p", Partition(0, 1))
            dead_letters.park(batch, "p", second, fnv1a_32("a"), error=None, attempts=0)

            def retry() -> None:
                with connect(db_url, autocommit=True) as operator:
                    dead_letters.request_retry(operator, letter.id)

            operator = threading.Thread(target=retry)
            operator.start()
            time.sleep(0.5)  # the retry now waits for the batch's locks
            batch.commit()
            operator.join(timeout=10)
        assert not operator.is_alive()
        assert [(x.aggregate_version, x.status) for x in dead_letters.list_letters(conn)] == [
            (1, "retry"),
            (2, "retry"),
        ]
        with conn.transaction():
            queued = dead_letters.open_letters(conn, "p", Partition(0, 1))
        assert [x.aggregate_version for x in queued.retry] == [1, 2]


def test_the_prober_reads_a_reply_cut_short_as_nothing_answering(tmp_path: Path) -> None:
    # kill -9 can land mid-reply: a short read must be an observation, not an
    # exception that ends the prober's thread (and its timeline) early.
    with socket.create_server(("127.0.0.1", 0)) as server:

        def reply_then_die() -> None:
            conn, _ = server.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 221\r\n\r\n"
                )

        threading.Thread(target=reply_then_die, daemon=True).start()
        process = WorkerProcess(
            WorkerSpec(0, 1), "postgresql://unused", name="w", log_path=tmp_path / "w.log", env={}
        )
        process.port = server.getsockname()[1]
        observation = process.readyz(timeout=5)
    assert (observation.code, observation.reason) == (None, "nothing answers")
