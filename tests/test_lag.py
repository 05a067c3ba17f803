"""Scrape-time lag (lag.py): exact through partition indexes, windowed without, and what each plan reads."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from psycopg import sql

from projectionist.consume import lag, partition_indexes
from projectionist.consume.checkpoints import register_group
from projectionist.consume.processor import Processor
from projectionist.consume.status import read_status
from projectionist.partitioning import Partition
from projectionist.store.connection import Connection, connect
from projectionist.telemetry.store_collector import read_store_snapshot
from tests.projections import Recorder, drain, load_sample

pytestmark = pytest.mark.integration


def _own_counts(conn: Connection, total_workers: int) -> list[int]:
    counts = dict(
        conn.execute(
            "SELECT partition_hash %% %s, count(*) FROM events GROUP BY 1", (total_workers,)
        ).fetchall()
    )
    return [int(counts.get(k, 0)) for k in range(total_workers)]


def _three_partitions(conn: Connection, without_index: int) -> list[int]:
    """3,000 events, a group of 3 whose partition ``without_index`` has no index; each one's events."""
    load_sample(conn, 3000, 61)
    register_group(conn, "recorder", 3)
    partition_indexes.create_indexes(conn, 3)
    dropped = partition_indexes.index_name(3, without_index)
    conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(dropped)))
    return _own_counts(conn, 3)


def _lags(conn: Connection, cap: int) -> dict[int, lag.PartitionLag]:
    return {p.worker_id: p for p in lag.read_lag(conn, ["recorder"], cap).partitions}


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _nodes(child)


def _executed(conn: Connection, query: sql.Composed) -> list[dict[str, Any]]:
    row = conn.execute(sql.SQL("EXPLAIN (ANALYZE, FORMAT JSON) {}").format(query)).fetchone()
    assert row is not None
    return list(_nodes(row[0][0]["Plan"]))


def test_through_partition_indexes_the_count_is_exact_up_to_the_cap(conn: Connection) -> None:
    load_sample(conn, 3000, 61)
    register_group(conn, "recorder", 3)
    partition_indexes.create_indexes(conn, 3)
    own = _own_counts(conn, 3)
    assert all(n > 50 for n in own)
    exact = _lags(conn, 10_000)
    assert [exact[k].lag_events for k in range(3)] == own
    assert all(exact[k].lag_seconds > 0 and exact[k].checkpoint_position == 0 for k in range(3))
    assert [p.lag_events for p in _lags(conn, 50).values()] == [50, 50, 50]

    # Partition 0 catches up: exactly 0, and 0 seconds.
    processor = Processor(Recorder(), Partition(0, 3))
    processor.start(conn)
    drain(conn, processor)
    caught_up = _lags(conn, 10_000)
    assert (caught_up[0].lag_events, caught_up[0].lag_seconds) == (0, 0.0)
    assert caught_up[0].checkpoint_position == processor.position.global_position  # type: ignore[union-attr]
    assert [caught_up[k].lag_events for k in (1, 2)] == own[1:]


def test_a_partition_without_its_index_counts_through_a_window(conn: Connection) -> None:
    own = _three_partitions(conn, without_index=1)
    assert [p.lag_events for p in _lags(conn, 10_000).values()] == own
    # A window of cap * 3 rows of every partition: about cap of partition 1's.
    windowed = _lags(conn, 50)
    assert windowed[0].lag_events == windowed[2].lag_events == 50
    assert 0 < windowed[1].lag_events <= 150


def test_each_count_reads_only_its_partitions_rows_up_to_the_cap(conn: Connection) -> None:
    load_sample(conn, 6000, 97)
    register_group(conn, "recorder", 4)
    partition_indexes.create_indexes(conn, 4)
    queries = lag._group_queries("recorder", 4, {0, 1, 3}, 100)
    assert len(queries) == 4  # three through their index, one for partition 2
    for k, query in zip((0, 1, 3), queries, strict=False):
        scans = [n for n in _executed(conn, query) if n.get("Relation Name") == "events"]
        assert {n["Node Type"] for n in scans} <= {"Index Scan", "Index Only Scan"}, scans
        assert {n["Index Name"] for n in scans} == {f"events_partition_4_{k}_idx"}
        # The count stops at the cap; the age reads one entry.
        assert sorted(n["Actual Rows"] for n in scans) == [1, 100]
        assert all(n.get("Rows Removed by Filter", 0) == 0 for n in scans)
    # Without its index: an ordered window of cap * N rows of the main index, never a full scan.
    scans = [n for n in _executed(conn, queries[3]) if n.get("Relation Name") == "events"]
    assert [(n["Node Type"], n["Index Name"], n["Actual Rows"]) for n in scans] == [
        ("Index Scan", "events_transaction_position_idx", 400)
    ]


def test_groups_without_indexes_or_with_one_partition(conn: Connection) -> None:
    load_sample(conn, 500, 13)
    register_group(conn, "recorder", 1)
    assert [p.lag_events for p in _lags(conn, 10_000).values()] == [500]
    assert [p.lag_events for p in _lags(conn, 40).values()] == [40]
    # A projection without a group yet: the store's head, and no partitions.
    nothing = lag.read_lag(conn, ["nobody"], 100)
    assert nothing.partitions == [] and nothing.head_position == 500


def test_status_counts_exactly_with_and_without_the_index(conn: Connection) -> None:
    own = _three_partitions(conn, without_index=2)
    for k in range(3):
        processor = Processor(Recorder(), Partition(k, 3), batch_size=100)
        processor.start(conn)
        processor.run_batch(conn, isolate=True)  # one batch of 100, no read-ahead
    workers = read_status(conn, "recorder").workers
    # Counted here without any index: the partition's rows after its checkpoint.
    expected = [
        conn.execute(  # type: ignore[index]
            "SELECT count(*) FROM events WHERE partition_hash %% 3 = %s"
            " AND (transaction_id, global_position) > (%s::text::xid8, %s)",
            (w.worker_id, str(w.checkpoint_transaction_id), w.checkpoint_position),
        ).fetchone()[0]
        for w in workers
    ]
    assert [w.lag_events for w in workers] == expected
    assert all(0 < n < total for n, total in zip(expected, own, strict=True))
    assert all(w.lag_seconds > 0 for w in workers)
    with conn.transaction(), pytest.raises(ValueError, match="outside a transaction"):
        read_status(conn, "recorder")


def test_a_caught_up_partition_never_scans_the_table(conn: Connection) -> None:
    # Rows after a caught-up checkpoint are estimated at a third of the table;
    # without a visibility map to make index-only scans cheap, an unordered
    # count capped well below that (as the default cap is in a big store)
    # would take a sequential scan of everything to find none.
    conn.execute("ALTER TABLE events SET (autovacuum_enabled = false)")
    load_sample(conn, 20000, 101)
    conn.execute("ANALYZE events")
    register_group(conn, "recorder", 1)
    processor = Processor(Recorder(), Partition(0, 1))
    processor.start(conn)
    drain(conn, processor)
    (query,) = lag._group_queries("recorder", 1, {0}, 1_000)
    scans = [n for n in _executed(conn, query) if n.get("Relation Name") == "events"]
    assert scans and all(n["Node Type"] != "Seq Scan" for n in scans), scans
    assert [p.lag_events for p in _lags(conn, 10_000).values()] == [0]


# A rescale committed between the scrape's group query and its lag query
# must not be read half before, half after: the old count's partitions with
# the checkpoints gone, a lag spike of the whole store on every one of them.
def test_a_scrape_reads_one_snapshot_across_a_rescale(
    conn: Connection, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    load_sample(conn, 600, 31)
    register_group(conn, "recorder", 2)
    for k in range(2):
        processor = Processor(Recorder(), Partition(k, 2), batch_size=500)
        processor.start(conn)
        drain(conn, processor)
    group_queries = lag._group_queries
    switched: list[object] = []

    def rescale_meanwhile(*args: Any, **kwargs: Any) -> list[sql.Composed]:
        if not switched:
            with connect(db_url, autocommit=True) as other:
                switched.append(register_group(other, "recorder", 3, allow_rescale=True))
        return group_queries(*args, **kwargs)

    monkeypatch.setattr(lag, "_group_queries", rescale_meanwhile)
    snapshot = read_store_snapshot(conn, ["recorder"], 10_000)
    assert switched  # the rescale did commit in between
    assert [(p.total_workers, p.worker_id, p.lag_events) for p in snapshot.lag.partitions] == [
        (2, 0, 0),
        (2, 1, 0),
    ]
