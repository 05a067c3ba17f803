"""Payloads kept as json text (migration 0004): upgrading a jsonb store, and what the text form changes."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest

from projectionist import NewEvent
from projectionist.consume.reader import PartitionReader
from projectionist.partitioning import Partition, fnv1a_32
from projectionist.records import Position
from projectionist.store.appending import append
from projectionist.store.connection import Connection, connect
from projectionist.store.schema import available_migrations, migrate
from projectionist.store.streams import read_stream
from projectionist.testing import PostgresServer, wait_until_readable

pytestmark = pytest.mark.integration

_PAYLOAD_COLUMNS = """
    SELECT column_name, data_type, column_default FROM information_schema.columns
    WHERE table_name = 'events' AND column_name IN ('payload', 'metadata') ORDER BY column_name
"""


def _insert_raw(conn: Connection, aggregate: str, version: int, payload: str) -> None:
    """A row as another writer (psql, an older release) would put it there, payload text as given."""
    conn.execute(
        "INSERT INTO events (event_id, aggregate_id, aggregate_version, partition_hash, event_type, payload) "
        "VALUES (%s, %s, %s, %s, 'Raw', %s)",
        (uuid.uuid4(), aggregate, version, fnv1a_32(aggregate), payload),
    )


@pytest.fixture
def before_0004(pg_server: PostgresServer) -> Iterator[str]:
    """An empty database migrated up to 0003 only: a store of the jsonb releases."""
    with pg_server.fresh_database() as url:
        with connect(url, autocommit=True) as conn:
            conn.execute(
                "CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            for m in available_migrations():
                if m.version < 4:
                    conn.execute(m.sql.encode())
                    conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (m.version, m.name)
                    )
        yield url


def test_upgrade_keeps_every_payload_of_a_jsonb_store(before_0004: str) -> None:
    with connect(before_0004, autocommit=True) as conn:
        assert [r[1] for r in conn.execute(_PAYLOAD_COLUMNS)] == ["jsonb", "jsonb"]
        old = {"s": "\u00e9\u6f22", "n": [1, 2.5, None, True], "nested": {"k": {"deep": "v"}}}
        # Written as jsonb values, as a release before 0004 stored them.
        conn.execute(
            "INSERT INTO events (event_id, aggregate_id, aggregate_version, partition_hash, event_type, "
            "payload, metadata) VALUES (%s, 'up', 1, %s, 'Old', %s::jsonb, %s::jsonb)",
            (
                uuid.uuid4(),
                fnv1a_32("up"),
                '{"s": "\\u00e9\\u6f22", "n": [1, 2.5, null, true], "nested": {"k": {"deep": "v"}}}',
                '{"correlation_id": "c-1"}',
            ),
        )
        _insert_raw(conn, "up", 2, "{}")  # the metadata default of the jsonb release

        applied = migrate(conn)

        # 0004 and every later migration.
        assert [m.version for m in applied] == [m.version for m in available_migrations() if m.version >= 4]
        assert list(conn.execute(_PAYLOAD_COLUMNS)) == [
            ("metadata", "json", "'{}'::json"),
            ("payload", "json", None),
        ]
        first, second = read_stream(conn, "up")
        assert first.payload == old and first.metadata == {"correlation_id": "c-1"}
        assert second.payload == {} and second.metadata == {}
        # The upgraded store takes appends and reads them back like a new one.
        append(conn, "up", [NewEvent("New", {"after": "upgrade"})])
        assert [e.payload for e in read_stream(conn, "up")] == [old, {}, {"after": "upgrade"}]
        # An appender of the jsonb release, still running during a rollout,
        # sends jsonb arrays; the assignment cast to json takes them.
        conn.execute(
            "INSERT INTO events (event_id, aggregate_id, aggregate_version, partition_hash, event_type, "
            "payload, metadata) SELECT * FROM unnest(%s::uuid[], %s::text[], %s::int8[], %s::int8[], "
            "%s::text[], %s::jsonb[], %s::jsonb[])",
            ([uuid.uuid4()], ["up"], [4], [fnv1a_32("up")], ["Old"], ['{"from": "old"}'], ["{}"]),
        )
        assert read_stream(conn, "up", from_version=4)[0].payload == {"from": "old"}


def test_payload_keeps_the_writers_key_order(conn: Connection) -> None:
    # jsonb sorted keys by length, then bytes; the text keeps the writer's order.
    append(conn, "order", [NewEvent("E", {"zebra": 1, "b": 2, "aa": 3})])
    (stored,) = read_stream(conn, "order")
    assert list(stored.payload) == ["zebra", "b", "aa"]
    wait_until_readable(conn)
    batch = PartitionReader(Partition(0, 1), 10).read(conn, Position())
    assert [list(e.payload) for e in batch.events] == [["zebra", "b", "aa"]]


@pytest.mark.parametrize("partitions", [1, 2])
def test_text_from_another_writer_is_read_as_written(conn: Connection, partitions: int) -> None:
    # The fast decoder refuses leading whitespace, which json.dumps never
    # writes but a hand-written INSERT may; such a row must still be read.
    with conn.transaction():
        _insert_raw(conn, "hand", 1, '  \n {"x" : [1, 2] }  ')
        _insert_raw(conn, "hand", 2, '{"y": "z"}')
    assert [e.payload for e in read_stream(conn, "hand")] == [{"x": [1, 2]}, {"y": "z"}]
    reader = PartitionReader(Partition(fnv1a_32("hand") % partitions, partitions), 10)
    wait_until_readable(conn)
    assert [e.payload for e in reader.read(conn, Position()).events] == [{"x": [1, 2]}, {"y": "z"}]


def test_the_column_still_refuses_what_is_not_json(conn: Connection) -> None:
    with pytest.raises(psycopg.errors.InvalidTextRepresentation):
        _insert_raw(conn, "bad", 1, "{not json")


def test_the_new_release_appends_and_reads_before_the_migration_ran(before_0004: str) -> None:
    # Rollouts in either order: code first, migration later, works too.
    with connect(before_0004, autocommit=True) as conn:
        append(conn, "early", [NewEvent("New", {"zebra": 1, "a": [1, 2]})])
        (stored,) = read_stream(conn, "early")
        assert stored.payload == {"zebra": 1, "a": [1, 2]}
        wait_until_readable(conn)
        assert [e.payload for e in PartitionReader(Partition(0, 1), 10).read(conn, Position()).events] == [
            stored.payload
        ]
