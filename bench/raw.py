"""The physical limit: plain psycopg on a table of exactly projectionist's shape.

Three ways to send workload 1's batches, each its own contestant so they take
turns with the others: ``executemany`` (one INSERT per row, pipelined), one
multi-row INSERT over ``unnest``ed binary arrays, and binary ``COPY``. The
report judges the batched append against the fastest of them.

The table is created by projectionist's own migration, so columns, defaults,
constraints and indexes match to the letter. Raw does none of the store's
work: versions come from a client-side counter (no read, no lock, no check),
and the scan pages through the primary key with no gap fence and no partition
filter. It does decode every payload (JSON to dict), as any consumer must, and
the same way projectionist's reader does: the payload fetched as text and given
to ``json.JSONDecoder().raw_decode`` (psycopg's own JSON loader takes about
twice as long per row, and ``json.loads`` adds checks that ``json.dumps`` output
never needs), so the ratio measures the store's own work, not the choice
of decoder. Metadata comes back as text, undecoded, as projectionist's reader
returns it. Results come in binary (transaction_id too, with the reader's xid8
loader), and created_at in UTC, as the reader gets them.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from psycopg.types.json import Json

from bench.contestants import Contestant, Writer, paged_catch_up
from bench.data import (
    EVENT_TYPE,
    PEER_CHECKPOINT_DDL,
    READ_MODEL_DDL,
    Event,
)
from projectionist.consume.reader import register_xid8_loader
from projectionist.partitioning import fnv1a_32
from projectionist.store.schema import migrate

_COLUMNS = "event_id, aggregate_id, aggregate_version, partition_hash, event_type, payload, metadata"
_INSERT = f"INSERT INTO events ({_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s)"
# One statement per transaction, the arrays sent in binary, as projectionist sends its own.
_INSERT_UNNEST = (
    f"INSERT INTO events ({_COLUMNS}) SELECT * FROM unnest("
    "%b::uuid[], %b::text[], %b::int8[], %b::int8[], %b::text[], %b::json[], %b::json[])"
)
_COPY = f"COPY events ({_COLUMNS}) FROM STDIN (FORMAT BINARY)"
_COPY_TYPES = ["uuid", "text", "int8", "int8", "text", "json", "json"]
# The same columns, in the same form, as projectionist's reader returns, in primary-key order.
_SCAN = (
    "SELECT global_position, transaction_id AS txid, event_id, aggregate_id, aggregate_version, "
    "event_type, payload::text AS payload, metadata::text AS metadata, created_at FROM events "
    "WHERE global_position > %s "
    "ORDER BY global_position LIMIT %s"
)


class _Versions:
    """Client-side version counters and cached partition hashes: what raw skips asking the server."""

    def __init__(self) -> None:
        self.version: dict[str, int] = {}
        self.hash: dict[str, int] = {}

    def next(self, agg: str) -> tuple[int, int]:
        v = self.version.get(agg, 0) + 1
        self.version[agg] = v
        h = self.hash.get(agg)
        if h is None:
            h = self.hash[agg] = fnv1a_32(agg)
        return v, h

    def row(self, agg: str, body: dict[str, Any]) -> tuple[Any, ...]:
        v, h = self.next(agg)
        return (uuid.uuid4(), agg, v, h, EVENT_TYPE, Json(body), Json({}))


class _RawWriter(Writer):
    def __init__(self, raw: Raw) -> None:
        self.conn = raw.connect()
        self.versions = _Versions()

    def write(self, aggregate: str, body: dict[str, Any]) -> None:
        # Autocommit: one INSERT is one transaction, one round trip.
        self.conn.execute(_INSERT, self.versions.row(aggregate, body))

    def close(self) -> None:
        self.conn.close()


class Raw(Contestant):
    key = "raw"
    label = "raw psycopg"

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.versions = _Versions()

    def setup(self) -> None:
        with self.connect() as conn:
            migrate(conn)
            conn.execute(READ_MODEL_DDL)
            conn.execute(PEER_CHECKPOINT_DDL)

    def reset(self) -> None:
        with self.connect() as conn:
            conn.execute("TRUNCATE events, bench_read_model, bench_checkpoint RESTART IDENTITY")
        self.versions = _Versions()

    def events_table(self) -> str:
        return "events"

    def append_batches(self, transactions: list[list[Event]]) -> float:
        with self.connect() as conn:
            started = time.perf_counter()
            for txn in transactions:
                with conn.transaction(), conn.cursor() as cur:
                    # executemany pipelines the INSERTs: one round trip per batch.
                    cur.executemany(_INSERT, [self.versions.row(agg, body) for agg, body in txn])
            return time.perf_counter() - started

    def writer(self, thread: int, events: list[Event]) -> Writer:
        return _RawWriter(self)

    def catch_up(self, *, read_model: bool, batch_size: int, name: str) -> tuple[int, float]:
        with self.connect() as conn:
            # The worker's session setting, so created_at comes back in the same form.
            conn.execute("SET TimeZone = 'UTC'")
            register_xid8_loader(conn)

            def read_page(position: int) -> list[tuple[Any, ...]]:
                rows = conn.execute(_SCAN, (position, batch_size), binary=True).fetchall()
                _decode(rows)
                return rows

            return paged_catch_up(
                conn,
                read_model=read_model,
                name=name,
                first=0,
                read_page=read_page,
                position_of=lambda r: int(r[0]),
                next_from=lambda r: int(r[0]),
                model_rows=lambda rows: [(r[3], r[0]) for r in rows],
            )


_raw_decode = json.JSONDecoder().raw_decode


def _decode(rows: list[tuple[Any, ...]]) -> list[Any]:
    return [_raw_decode(r[6])[0] for r in rows]


class RawUnnest(Raw):
    """Workload 1 only: one multi-row INSERT per transaction over binary arrays."""

    key = "raw_unnest"
    label = "raw psycopg (unnest INSERT)"

    def append_batches(self, transactions: list[list[Event]]) -> float:
        with self.connect() as conn:
            started = time.perf_counter()
            for txn in transactions:
                rows = [self.versions.row(agg, body) for agg, body in txn]
                # Autocommit: the one statement is the whole transaction.
                conn.execute(_INSERT_UNNEST, [list(column) for column in zip(*rows, strict=True)])
            return time.perf_counter() - started


class RawCopy(Raw):
    """Workload 1 only: one binary COPY per transaction."""

    key = "raw_copy"
    label = "raw psycopg (COPY)"

    def append_batches(self, transactions: list[list[Event]]) -> float:
        with self.connect() as conn:
            started = time.perf_counter()
            for txn in transactions:
                with conn.transaction(), conn.cursor() as cur, cur.copy(_COPY) as copy:
                    copy.set_types(_COPY_TYPES)
                    for agg, body in txn:
                        copy.write_row(self.versions.row(agg, body))
            return time.perf_counter() - started
