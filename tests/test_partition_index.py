"""Partition indexes: each worker's read walks its own partial index, and only its own rows; workers
take an index up when it is built and let go when it goes; a drop spares running workers."""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from psycopg import sql

from projectionist.consume import partition_indexes
from projectionist.consume import processor as processor_module
from projectionist.consume.checkpoints import register_group
from projectionist.consume.ownership import TRY_LOCK, group_key
from projectionist.consume.processor import Processor
from projectionist.consume.reader import RetiredGroupMarks, build_read_query
from projectionist.errors import ConfigError
from projectionist.hooks import WorkerState
from projectionist.partitioning import Partition
from projectionist.records import Position
from projectionist.settings import WorkerOptions
from projectionist.store.connection import Connection, connect
from projectionist.telemetry.metrics import MetricsHooks
from projectionist.testing import wait_for
from projectionist.worker.worker import Worker
from tests.helpers import RecordingHooks, run_cli
from tests.projections import Recorder, drain, load_sample, verify_exactly_once

pytestmark = pytest.mark.integration


def _invalidate(conn: Connection, name: str) -> None:
    """What a failed or cancelled CREATE INDEX CONCURRENTLY leaves behind."""
    conn.execute("UPDATE pg_index SET indisvalid = false WHERE indexrelid = %s::regclass", (name,))


def _plan(conn: Connection, query: str, params: dict[str, object]) -> str:
    return "\n".join(r[0] for r in conn.execute("EXPLAIN " + query, params))


def _scan_of_partition_rows(conn: Connection, query: str) -> dict[str, Any]:
    """The executed plan node that reads the partition's rows (the first branch of the UNION)."""
    (doc,) = conn.execute(
        "EXPLAIN (ANALYZE, FORMAT JSON) " + query, {"txid": "0", "pos": 0, "limit": 100_000}
    ).fetchone()  # type: ignore[misc]
    node = doc[0]["Plan"]
    while node.get("Alias") != "w":
        node = node["Plans"][0]
    return dict(node)


@pytest.mark.parametrize("marks", [False, True], ids=["no-marks", "skip-marks"])
def test_the_read_walks_the_partitions_own_index(conn: Connection, marks: bool) -> None:
    load_sample(conn, 20000, 50)
    # Built on a table never analyzed: create_indexes gathers the statistics.
    assert partition_indexes.create_indexes(conn, 4) == [f"events_partition_4_{k}_idx" for k in range(4)]
    assert partition_indexes.is_ready(conn, 4, 1)
    rows = conn.execute(
        "SELECT transaction_id, global_position FROM events"
        " ORDER BY transaction_id, global_position OFFSET 10000 LIMIT 3"
    ).fetchall()
    layers = (RetiredGroupMarks(3, tuple(Position(int(tx), pos) for tx, pos in rows)),) if marks else ()
    query = build_read_query(Partition(1, 4), layers, indexed=True).as_string(conn)
    middle = rows[0]
    # The custom plan and the generic plan psycopg gets after 5 runs, from the
    # start and from the middle of the table.
    for mode in ("force_custom_plan", "force_generic_plan"):
        conn.execute(f"SET plan_cache_mode = {mode}")
        for txid, pos in (("0", 0), (str(middle[0]), middle[1])):
            plan = _plan(conn, query, {"txid": txid, "pos": pos, "limit": 500})
            assert "Index Scan using events_partition_4_1_idx" in plan, plan
            assert "Seq Scan" not in plan and "Sort" not in plan, plan


def test_without_statistics_the_reader_keeps_the_main_index(conn: Connection) -> None:
    # An index built by hand on a table that was never analyzed (say, restored
    # from a dump before autovacuum got to it): the plain predicate would sort
    # the partition's remainder under every batch, so the reader does not use it.
    conn.execute("ALTER TABLE events SET (autovacuum_enabled = false)")
    load_sample(conn, 20000, 50)
    conn.execute(
        "CREATE INDEX events_partition_4_1_idx ON events (transaction_id, global_position)"
        " WHERE partition_hash % 4 = 1"
    )
    plain = build_read_query(Partition(1, 4), indexed=True).as_string(conn)
    assert "Sort" in _plan(conn, plain, {"txid": "0", "pos": 0, "limit": 500})
    assert not partition_indexes.is_ready(conn, 4, 1)
    processor = Processor(Recorder(), Partition(1, 4), batch_size=500)
    processor.start(conn)
    assert not processor.reader.indexed
    conn.execute("ANALYZE events")
    processor.start(conn)
    assert processor.reader.indexed


_LABELS_0_OF_2 = {"projection": "recorder", "worker": "0", "total_workers": "2"}


def test_a_running_worker_takes_up_and_lets_go_of_its_index(
    conn: Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(processor_module, "INDEX_RECHECK_SECONDS", 0.0)
    load_sample(conn, 2000, 31)
    registry = CollectorRegistry()
    processor = Processor(
        Recorder(), Partition(0, 2), batch_size=100, hooks=MetricsHooks(registry, version="test")
    )

    def gauge() -> float | None:
        return registry.get_sample_value("projectionist_partition_index_used", _LABELS_0_OF_2)

    assert gauge() is None  # unknown until the first check
    processor.start(conn)
    assert not processor.reader.indexed
    assert gauge() == 0
    processor.run_batch(conn)
    partition_indexes.create_indexes(conn, 2)
    processor.run_batch(conn)  # the check follows the batch
    assert processor.reader.indexed
    assert gauge() == 1
    conn.execute("DROP INDEX events_partition_2_0_idx")
    processor.run_batch(conn)
    assert not processor.reader.indexed
    assert gauge() == 0
    drain(conn, processor)
    counts = verify_exactly_once(conn)
    assert counts["duplicated"] == counts["misordered"] == counts["wrong_worker"] == 0
    applied = conn.execute("SELECT count(*) FROM applied_events").fetchone()
    ours = conn.execute("SELECT count(*) FROM events WHERE partition_hash % 2 = 0").fetchone()
    assert applied == ours


def test_an_idle_worker_takes_up_an_index_built_while_it_runs(
    conn: Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On a quiet store the re-check must still run, or projectionist_partition_index_used
    # stays 0 (and its alert fires) after the operator built the index.
    load_sample(conn, 100, 10)
    conn.execute("ANALYZE events")
    processor = Processor(Recorder(), Partition(0, 2), batch_size=500)
    processor.start(conn)
    assert processor.reader.indexed is False
    while processor.run_batch(conn).visible:
        pass
    partition_indexes.create_indexes(conn, 2, lambda line: None)
    monkeypatch.setattr(processor_module, "INDEX_RECHECK_SECONDS", 0.0)
    time.sleep(0.01)
    outcome = processor.run_batch(conn)  # idle: nothing new
    assert not outcome.visible
    assert processor.reader.indexed is True, processor.unindexed_reason


def test_with_its_index_a_read_visits_only_its_own_rows(conn: Connection) -> None:
    load_sample(conn, 4000, 97)
    partition = Partition(2, 3)
    ours = conn.execute("SELECT count(*) FROM events WHERE partition_hash % 3 = 2").fetchone()
    assert ours is not None and 0 < ours[0] < 4000
    # The control: without the index the scan steps over the other partitions' rows.
    walked = _scan_of_partition_rows(conn, build_read_query(partition).as_string(conn))
    assert walked["Actual Rows"] == ours[0]
    assert walked["Rows Removed by Filter"] == 4000 - ours[0]
    partition_indexes.create_indexes(conn, 3)
    direct = _scan_of_partition_rows(conn, build_read_query(partition, indexed=True).as_string(conn))
    assert direct["Index Name"] == "events_partition_3_2_idx"
    assert direct["Actual Rows"] == ours[0]
    assert direct.get("Rows Removed by Filter", 0) == 0


def test_workers_use_their_indexes_and_apply_every_event_once(conn: Connection) -> None:
    load_sample(conn, 3000, 61)
    partition_indexes.create_indexes(conn, 3)
    # Partition 1's index is gone: that worker falls back to the main index.
    conn.execute("DROP INDEX events_partition_3_1_idx")
    used = []
    for k in range(3):
        processor = Processor(Recorder(), Partition(k, 3), batch_size=128)
        processor.start(conn)
        used.append(processor.reader.indexed)
        drain(conn, processor)
    assert used == [True, False, True]
    assert verify_exactly_once(conn) == {"lost": 0, "duplicated": 0, "misordered": 0, "wrong_worker": 0}


def test_a_single_partition_never_asks_for_an_index(conn: Connection) -> None:
    load_sample(conn, 100, 7)
    registry = CollectorRegistry()
    processor = Processor(
        Recorder(), Partition(0, 1), batch_size=50, hooks=MetricsHooks(registry, version="test")
    )
    processor.start(conn)
    assert not processor.reader.indexed
    # Every row is its own, so it reads only its own rows without one.
    labels = {"projection": "recorder", "worker": "0", "total_workers": "1"}
    assert registry.get_sample_value("projectionist_partition_index_used", labels) == 1
    with pytest.raises(ConfigError, match="at least 2"):
        partition_indexes.create_indexes(conn, 1)


def test_create_is_idempotent_and_rebuilds_an_invalid_build(conn: Connection) -> None:
    load_sample(conn, 500, 11)
    lines: list[str] = []
    assert len(partition_indexes.create_indexes(conn, 2, lines.append)) == 2
    assert partition_indexes.create_indexes(conn, 2, lines.append) == []
    assert sum("present" in line for line in lines) == 2
    _invalidate(conn, "events_partition_2_0_idx")
    assert not partition_indexes.is_ready(conn, 2, 0)
    assert partition_indexes.is_ready(conn, 2, 1)
    assert partition_indexes.create_indexes(conn, 2, lines.append) == ["events_partition_2_0_idx"]
    assert any("dropped an invalid earlier build" in line for line in lines)
    assert partition_indexes.is_ready(conn, 2, 0)


def test_create_needs_autocommit(db_url: str) -> None:
    with connect(db_url) as conn, pytest.raises(ValueError, match="autocommit"):
        partition_indexes.create_indexes(conn, 2)


def test_drop_is_refused_while_a_worker_of_that_size_runs(conn: Connection, db_url: str) -> None:
    load_sample(conn, 500, 11)
    partition_indexes.create_indexes(conn, 2)
    register_group(conn, "orders", 2)
    with connect(db_url, autocommit=True) as worker:
        assert worker.execute(TRY_LOCK, (group_key("orders", 2), 1)).fetchone() == (True,)
        with pytest.raises(ConfigError, match="orders"):
            partition_indexes.drop_indexes(conn, 2)
        assert partition_indexes.is_ready(conn, 2, 0)
        assert len(partition_indexes.drop_indexes(conn, 2, force=True)) == 2
    assert not partition_indexes.is_ready(conn, 2, 0)
    # With no worker running, no --force is needed.
    partition_indexes.create_indexes(conn, 2)
    assert len(partition_indexes.drop_indexes(conn, 2)) == 2


# drop may wait minutes for another build; workers that start meanwhile must
# still keep their indexes (without --force).
def test_drop_rechecks_running_workers_after_waiting_for_the_builder_lock(
    conn: Connection, db_url: str
) -> None:
    conn.execute(
        "INSERT INTO events (event_id, aggregate_id, aggregate_version, partition_hash, event_type, payload)"
        " SELECT gen_random_uuid(), 'a' || g, 1, g, 'E', '{}' FROM generate_series(1, 200) g"
    )
    partition_indexes.create_indexes(conn, 2)
    register_group(conn, "orders", 2)
    outcome: list[object] = []
    with connect(db_url, autocommit=True) as other_builder, connect(db_url, autocommit=True) as worker:
        # Another session's build or drop is running.
        assert other_builder.execute(partition_indexes._TRY_BUILDER_LOCK).fetchone() == (True,)

        def drop() -> None:
            try:
                with connect(db_url, autocommit=True) as own:
                    outcome.append(partition_indexes.drop_indexes(own, 2))
            except BaseException as e:
                outcome.append(e)

        dropper = threading.Thread(target=drop)
        dropper.start()
        time.sleep(1.0)  # drop has checked for live workers and now waits for the lock
        # A worker of the 2-partition group starts meanwhile.
        assert worker.execute(TRY_LOCK, (group_key("orders", 2), 0)).fetchone() == (True,)
        other_builder.execute(partition_indexes._BUILDER_UNLOCK)
        dropper.join(30)
        assert len(outcome) == 1
        assert isinstance(outcome[0], ConfigError), f"dropped under a running worker: {outcome[0]}"
        assert partition_indexes.is_ready(conn, 2, 0)


def test_the_cli_builds_lists_and_reports_the_indexes(conn: Connection, db_url: str) -> None:
    load_sample(conn, 300, 9)
    register_group(conn, "orders", 3)
    refused = run_cli("partition-index", "create", "--total-workers", "1", db_url=db_url)
    assert refused.returncode == 2 and "at least 2" in refused.stderr
    status = json.loads(run_cli("status", "--json", db_url=db_url).stdout)
    assert status["projections"]["orders"]["indexed_partitions"] == 0

    built = run_cli("partition-index", "create", "--total-workers", "3", db_url=db_url)
    assert built.returncode == 0, built.stderr
    assert "events_partition_3_2_idx: built in" in built.stdout and "(3 of 3)" in built.stdout

    listed = json.loads(run_cli("partition-index", "list", "--json", db_url=db_url).stdout)
    assert [(x["total_workers"], x["valid"], x["groups"]) for x in listed] == [(3, 3, ["orders"])]
    status = json.loads(run_cli("status", "--json", db_url=db_url).stdout)
    assert status["projections"]["orders"]["indexed_partitions"] == 3
    assert status["planner_statistics"] is True
    # Without statistics no worker reads through its index, which "3 of 3" alone would hide.
    # (No autoanalyze may gather them again meanwhile.)
    conn.execute("ALTER TABLE events SET (autovacuum_enabled = off)")
    conn.execute("DELETE FROM pg_statistic WHERE starelid = 'events'::regclass")
    status = json.loads(run_cli("status", "--json", db_url=db_url).stdout)
    assert (status["planner_statistics"], status["projections"]["orders"]["indexed_partitions"]) == (False, 3)
    Processor(Recorder("orders"), Partition(0, 3), batch_size=10).start(conn)
    text = " ".join(run_cli("status", db_url=db_url).stdout.split())  # the caption wraps
    assert "partition indexes 3 of 3, not used until the events table has planner statistics" in text
    conn.execute("ANALYZE events")
    assert "not used until" not in run_cli("status", db_url=db_url).stdout

    dropped = run_cli("partition-index", "drop", "--total-workers", "3", db_url=db_url)
    assert dropped.returncode == 0 and "3 dropped" in dropped.stdout
    listed_text = run_cli("partition-index", "list", db_url=db_url).stdout
    assert "incomplete: projectionist partition-index create --partitions 3" in listed_text


def _ready_in_sql(conn: Connection, total_workers: int, worker_id: int) -> bool:
    """partition_indexes.ready_condition, evaluated as lag.py embeds it."""
    query = sql.SQL("SELECT {}").format(
        partition_indexes.ready_condition(sql.Literal(total_workers), sql.Literal(worker_id))
    )
    row = conn.execute(query).fetchone()
    assert row is not None
    return bool(row[0])


def test_each_reason_for_reading_without_the_index_is_named(conn: Connection) -> None:
    # Each step also checks that the SQL form of the rule (lag.py) agrees.
    conn.execute("ALTER TABLE events SET (autovacuum_enabled = false)")
    assert partition_indexes.why_not_ready(conn, 2, 1) == "there is no index events_partition_2_1_idx"
    assert not _ready_in_sql(conn, 2, 1)
    conn.execute(
        "CREATE INDEX events_partition_2_1_idx ON events (transaction_id, global_position)"
        " WHERE partition_hash % 2 = 1"
    )
    assert partition_indexes.why_not_ready(conn, 2, 1) == partition_indexes.NO_STATISTICS
    assert not _ready_in_sql(conn, 2, 1)
    load_sample(conn, 300, 7)
    conn.execute("ANALYZE events")
    assert partition_indexes.why_not_ready(conn, 2, 1) is None
    assert _ready_in_sql(conn, 2, 1)
    assert not _ready_in_sql(conn, 2, 0)
    _invalidate(conn, "events_partition_2_1_idx")
    assert "not valid" in (partition_indexes.why_not_ready(conn, 2, 1) or "")
    assert not _ready_in_sql(conn, 2, 1)


@pytest.mark.parametrize("built", [False, True], ids=["missing", "built"])
def test_a_worker_without_its_index_says_so(
    db_url: str, built: bool, caplog: pytest.LogCaptureFixture
) -> None:
    with connect(db_url, autocommit=True) as conn:
        load_sample(conn, 300, 7)
        conn.execute("ANALYZE events")
        if built:
            partition_indexes.create_indexes(conn, 2)
    caplog.set_level(logging.INFO, logger="projectionist")
    hooks = RecordingHooks()
    worker = Worker(db_url, Recorder(), Partition(1, 2), WorkerOptions(poll_interval=0.2), hooks=hooks)
    worker.start()
    try:
        wait_for(lambda: WorkerState.LIVE in hooks.states, "the worker to go live", timeout=20)
    finally:
        worker.stop()
        worker.join(timeout=10)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    hint = "projectionist partition-index create --partitions 2"
    if built:
        assert not any(hint in w for w in warnings), warnings
        assert worker.processor.reader.indexed
    else:
        missing = "there is no index events_partition_2_1_idx"
        assert any(missing in w and hint in w for w in warnings), warnings


def test_two_builders_at_once_both_succeed(conn: Connection, db_url: str) -> None:
    # Two `migrate --partition-indexes 4` at once (two deploys racing).
    load_sample(conn, 20000, 50)
    errors: list[BaseException] = []
    built: list[list[str]] = []

    def build() -> None:
        try:
            with connect(db_url, autocommit=True) as own:
                built.append(partition_indexes.create_indexes(own, 4))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert all(partition_indexes.is_ready(conn, 4, k) for k in range(4))
    # They took turns: the second found the first one's indexes present.
    assert sorted(name for names in built for name in names) == [
        f"events_partition_4_{k}_idx" for k in range(4)
    ]
