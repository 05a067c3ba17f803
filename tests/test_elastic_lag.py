"""``projectionist_lag(projection)``, the SQL lag an autoscaler polls (migration 0006).

It must agree with the metrics' lag (consume/lag.py), work with no worker and
no group at all, leave out what skip marks cover, stay cheap (each partition's
count through its own index: the plans are read back with auto_explain), and
be callable by a role that may only read the store's tables.
"""

from __future__ import annotations

import re
import threading
import time
import uuid

import psycopg
import pytest
from psycopg import sql

from projectionist.consume import lag, membership, partition_indexes
from projectionist.consume.checkpoints import GroupConfig, register_group
from projectionist.consume.processor import Processor
from projectionist.partitioning import Partition
from projectionist.store.connection import Connection, connect
from tests.projections import Recorder, drain, load_sample

pytestmark = pytest.mark.integration


def _sql_lag(
    conn: Connection, projection: str = "recorder", cap: int = 10_000, samples: int = 1
) -> tuple[int, int, float, int, float]:
    row = conn.execute(
        "SELECT * FROM projectionist_lag(%s, %s, busy_samples => %s)", (projection, cap, samples)
    ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), float(row[2]), int(row[3]), float(row[4])


def _metrics_lag(conn: Connection, cap: int = 10_000) -> tuple[int, float]:
    parts = lag.read_lag(conn, ["recorder"], cap).partitions
    return sum(p.lag_events for p in parts), max(p.lag_seconds for p in parts)


def _apply_some(conn: Connection, total: int, batches: int) -> None:
    for k in range(total):
        processor = Processor(Recorder(), Partition(k, total), batch_size=100)
        processor.start(conn)
        for _ in range(batches):
            processor.run_batch(conn, isolate=True)  # no read-ahead: one batch each


@pytest.mark.parametrize("indexed", [True, False], ids=["partition-indexes", "no-indexes"])
def test_it_agrees_with_the_metrics_lag(conn: Connection, indexed: bool) -> None:
    load_sample(conn, 3000, 61)
    register_group(conn, "recorder", 4)
    if indexed:
        partition_indexes.create_indexes(conn, 4)
    # With no worker ever run: everything is behind.
    partitions, behind, seconds, members, busy = _sql_lag(conn)
    assert (partitions, behind, members, busy) == (4, 3000, 0, 0) and seconds > 0
    _apply_some(conn, 4, batches=3)
    behind, seconds = _sql_lag(conn)[1:3]
    expected_behind, expected_seconds = _metrics_lag(conn)
    assert behind == expected_behind == 3000 - 4 * 300
    assert seconds == pytest.approx(expected_seconds, abs=1.0)
    # The cap bounds each partition's count, as LAG_COUNT_CAP bounds a scrape's.
    capped = _sql_lag(conn, cap=50)[1]
    assert capped == _metrics_lag(conn, cap=50)[0]
    if indexed:
        assert capped == 4 * 50
    for k in range(4):
        processor = Processor(Recorder(), Partition(k, 4))
        processor.start(conn)
        drain(conn, processor)
    assert _sql_lag(conn)[1:3] == (0, 0.0)


def test_before_any_group_every_event_is_behind(conn: Connection) -> None:
    assert _sql_lag(conn, "nobody") == (0, 0, 0.0, 0, 0.0)
    load_sample(conn, 300, 11)
    partitions, behind, seconds, _, _ = _sql_lag(conn, "nobody")
    assert (partitions, behind) == (0, 300) and seconds > 0
    assert _sql_lag(conn, "nobody", cap=100)[1] == 100


def test_events_under_skip_marks_are_not_behind(conn: Connection) -> None:
    load_sample(conn, 2000, 53)
    register_group(conn, "recorder", 2)
    _apply_some(conn, 2, batches=4)
    switched = register_group(conn, "recorder", 3, allow_rescale=True)
    assert isinstance(switched, GroupConfig) and switched.layers
    behind, seconds = _sql_lag(conn)[1:3]
    assert (behind, seconds) == pytest.approx(_metrics_lag(conn), abs=1.0)
    assert behind == 2000 - 2 * 400  # the 800 the old group applied are not counted again


def test_it_counts_members_and_the_busy_ones(db_url: str, conn: Connection) -> None:
    register_group(conn, "recorder", 4)
    with connect(db_url, autocommit=True) as idle, connect(db_url, autocommit=True) as busy:
        membership.join(idle, "recorder", 4)
        membership.join(busy, "recorder", 4)
        assert _sql_lag(conn)[3:] == (2, 0.0)
        with busy.transaction():
            busy.execute("SELECT 1")  # inside a batch
            assert _sql_lag(conn)[3:] == (2, 1.0)
            # Averaged over several looks: busy for all of them here.
            assert _sql_lag(conn, samples=4)[3:] == (2, 1.0)
        stop = threading.Event()

        def half_busy() -> None:
            # In a transaction for 20 ms out of every 40.
            while not stop.is_set():
                with busy.transaction():
                    busy.execute("SELECT pg_sleep(0.02)")
                time.sleep(0.02)

        thread = threading.Thread(target=half_busy)
        thread.start()
        try:
            averaged = _sql_lag(conn, samples=50)[4]
        finally:
            stop.set()
            thread.join()
        assert 0.1 < averaged < 0.9, averaged
    with pytest.raises(psycopg.errors.RaiseException, match="busy_samples"):
        _sql_lag(conn, samples=0)


def test_each_partition_is_counted_through_its_own_index(conn: Connection) -> None:
    load_sample(conn, 4000, 97)
    register_group(conn, "recorder", 4)
    partition_indexes.create_indexes(conn, 4)
    try:
        conn.execute("LOAD 'auto_explain'")
    except psycopg.Error:
        pytest.skip("auto_explain is not installed on this server")
    for setting, value in (
        ("auto_explain.log_min_duration", "0"),
        ("auto_explain.log_nested_statements", "on"),
        ("auto_explain.log_level", "notice"),
        ("client_min_messages", "notice"),
    ):
        conn.execute(sql.SQL("SET {} = {}").format(sql.Identifier(*setting.split(".")), sql.Literal(value)))
    plans: list[str] = []
    conn.add_notice_handler(lambda d: plans.append(str(d.message_primary)))
    _sql_lag(conn, cap=100)
    counts = [p for p in plans if "FROM events e WHERE e.partition_hash %" in p]
    assert len(counts) == 4, plans
    for k in range(4):
        (plan,) = [p for p in counts if re.search(rf"partition_hash % 4 = {k} AND", p)]
        assert f"events_partition_4_{k}_idx" in plan, plan
    assert not any("Seq Scan on events" in p for p in plans), plans


def test_a_role_that_only_reads_the_store_can_call_it(db_url: str, conn: Connection) -> None:
    load_sample(conn, 100, 5)
    register_group(conn, "recorder", 2)
    role = f"keda_{uuid.uuid4().hex[:8]}"
    conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    try:
        # What docs/operate/database-roles.md grants an autoscaler.
        conn.execute(
            sql.SQL(
                "GRANT SELECT ON events, projection_groups, projection_checkpoints, projection_skip_marks"
                " TO {}"
            ).format(sql.Identifier(role))
        )
        with connect(f"{db_url} user={role}", autocommit=True) as keda:
            assert _sql_lag(keda)[:2] == (2, 100)
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                keda.execute("INSERT INTO projection_groups VALUES ('x', 1)")
    finally:
        conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
