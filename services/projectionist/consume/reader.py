"""The gap-safe, partition-filtered read: the one query every worker batch runs.

A row is read only once every older transaction has ended, in
``(transaction_id, global_position)`` order, and only the partition's own rows
are read, through its index where it has one. Both decisions, and the plans
they keep: ``docs/design/read-path.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import Cursor, sql
from psycopg.pq import Format
from psycopg.types.numeric import Int8BinaryLoader

from projectionist.partitioning import Partition
from projectionist.records import Position, RecordedEvent, recorded_event_from_row
from projectionist.store import lenient_timestamps
from projectionist.store.connection import Connection


@dataclass(frozen=True, slots=True)
class RetiredGroupMarks:
    """A retired group's final checkpoints: ``marks[k]`` is where its partition k stopped.

    An event of old partition ``partition_hash % total_workers == k`` at or
    below ``marks[k]`` was already applied, so a new group must skip it.
    """

    total_workers: int
    marks: tuple[Position, ...]

    @property
    def lowest(self) -> Position:
        return min(self.marks)

    @property
    def highest(self) -> Position:
        return max(self.marks)


@dataclass(frozen=True, slots=True)
class Batch:
    """This partition's next events, and where the checkpoint may move after them.

    ``end`` is ``None`` when nothing new is visible. ``more`` says the batch
    was full, so the caller should read again without waiting.
    """

    events: list[RecordedEvent]
    end: Position | None
    more: bool


def partition_filter(partition: Partition) -> sql.Composable:
    if partition.total_workers == 1:
        return sql.SQL("true")
    # Literals, not parameters: they are fixed for the worker's life, and this
    # keeps one prepared plan per worker.
    return sql.SQL("w.partition_hash %% {n} = {k}").format(
        n=sql.Literal(partition.total_workers), k=sql.Literal(partition.worker_id)
    )


def skip_filter(
    layers: tuple[RetiredGroupMarks, ...], *, alias: str = "w", with_params: bool = True
) -> sql.Composable:
    """Drop rows a retired group already applied (see migrations/0002_rescale.sql).

    A plain OR of literal conditions, one per old partition: a NOT EXISTS over
    a VALUES list would be an anti-join, and a hash anti-join loses the scan's
    order, putting a sort of everything after the checkpoint under each batch.
    ``with_params=False`` is for a statement sent without parameters, where
    ``%`` is the operator itself rather than its escape.
    """
    if not layers:
        return sql.SQL("false")
    modulo = sql.SQL("%%" if with_params else "%")
    return sql.SQL(" OR ").join(
        sql.SQL(
            "({a}.partition_hash {mod} {n} = {k}"
            " AND ({a}.transaction_id, {a}.global_position) <= ({tx}::xid8, {pos}::bigint))"
        ).format(
            a=sql.Identifier(alias),
            mod=modulo,
            n=sql.Literal(layer.total_workers),
            k=sql.Literal(k),
            tx=sql.Literal(str(mark.transaction_id)),
            pos=sql.Literal(mark.global_position),
        )
        for layer in layers
        for k, mark in enumerate(layer.marks)
    )


# With one partition and no skip marks every row is ours: no filter, no
# marker, and no "mine" column.
_SINGLE_PARTITION_QUERY = sql.SQL(
    """
    SELECT e.global_position, e.transaction_id AS txid, e.event_id,
           e.aggregate_id, e.aggregate_version, e.event_type, e.payload::text, e.metadata::text,
           e.created_at
    FROM events e
    WHERE e.transaction_id < pg_snapshot_xmin(pg_current_snapshot())
      AND (e.transaction_id, e.global_position) > (%(txid)s::text::xid8, %(pos)s)
    ORDER BY e.transaction_id, e.global_position
    LIMIT %(limit)s
    """
)


#: xid8's type oid, fixed in PostgreSQL's catalog (pg_type.dat) since xid8 appeared in 13.
XID8_OID = 5069


def register_xid8_loader(conn: Connection) -> None:
    """Load binary xid8 as int on this connection; psycopg has no loader of its own for it.

    An xid8 is an epoch shifted left by 32 bits plus a 32-bit xid, unsigned;
    int8's loader reads it exactly while the epoch stays below 2**31, which
    would take a cluster over 9 * 10**18 transactions.
    """
    conn.adapters.register_loader(XID8_OID, Int8BinaryLoader)


def build_read_query(
    partition: Partition, layers: tuple[RetiredGroupMarks, ...] = (), *, indexed: bool = False
) -> sql.SQL | sql.Composed:
    """The batch read; ``indexed`` says the partition's own index exists and is valid."""
    if partition.total_workers == 1 and not layers:
        return _SINGLE_PARTITION_QUERY
    # Without the partition's index, the CASE is what keeps the plan an
    # ordered index scan (see the module docstring); with it, the plain
    # predicate is what selects the index. The skip marks stay in a CASE
    # either way. test_worker and test_partition_index check the plans in both
    # plan-cache modes.
    if indexed and partition.total_workers > 1:
        condition = sql.SQL("({filter}) AND CASE WHEN NOT ({skip}) THEN true ELSE false END")
    else:
        condition = sql.SQL("CASE WHEN ({filter}) AND NOT ({skip}) THEN true ELSE false END")
    return sql.SQL(
        """
        (SELECT w.global_position, w.transaction_id AS txid, w.event_id,
                w.aggregate_id, w.aggregate_version, w.event_type, w.payload::text, w.metadata::text,
                w.created_at, true AS mine
         FROM events w
         WHERE w.transaction_id < pg_snapshot_xmin(pg_current_snapshot())
           AND (w.transaction_id, w.global_position) > (%(txid)s::text::xid8, %(pos)s)
           AND {condition}
         ORDER BY w.transaction_id, w.global_position
         LIMIT %(limit)s)
        UNION ALL
        (SELECT h.global_position, h.transaction_id, NULL, NULL, NULL, NULL, NULL,
                NULL, NULL, false
         FROM events h
         WHERE h.transaction_id < pg_snapshot_xmin(pg_current_snapshot())
         ORDER BY h.transaction_id DESC, h.global_position DESC
         LIMIT 1)
        """
    ).format(condition=condition.format(filter=partition_filter(partition), skip=skip_filter(layers)))


class PartitionReader:
    """Reads one partition's batches; holds the composed query so it is built once."""

    def __init__(
        self,
        partition: Partition,
        batch_size: int,
        layers: tuple[RetiredGroupMarks, ...] = (),
        *,
        indexed: bool = False,
    ) -> None:
        self.partition = partition
        self.batch_size = batch_size
        self.layers = layers
        #: Reads through the partition's own index (see partition_indexes.py).
        self.indexed = indexed
        self._query = _rendered(build_read_query(partition, layers, indexed=indexed))
        #: Event rows received from the server; each read also gets one marker row.
        self.rows_fetched = 0

    def use_index(self, indexed: bool) -> None:
        """Switch the read to (or off) the partition's own index; a read already sent is unaffected."""
        if indexed != self.indexed:
            self.indexed = indexed
            self._query = _rendered(build_read_query(self.partition, self.layers, indexed=indexed))

    def forget_passed_marks(self, position: Position) -> None:
        """Once past every mark the filter can never match again: drop it from the query."""
        if self.layers and all(position >= layer.highest for layer in self.layers):
            self.layers = ()
            self._query = _rendered(build_read_query(self.partition, indexed=self.indexed))

    def read(self, conn: Connection, after: Position) -> Batch:
        return self.send(conn, after).batch()

    def send(self, conn: Connection, after: Position) -> PendingRead:
        """Run the read; in pipeline mode this only sends it, and the rows arrive while the caller works."""
        # Binary results: psycopg parses the int8, uuid and timestamptz
        # columns faster from their binary form, about 6% of a batch's read;
        # the text columns (payload, metadata) are the same bytes either way.
        # transaction_id comes as xid8's binary form too, an unsigned 64-bit
        # integer: the server no longer formats it as text on every row
        # (a few percent of a backend's CPU in a catch-up).
        if conn.adapters.get_loader(XID8_OID, Format.BINARY) is None:
            register_xid8_loader(conn)
        cursor = conn.execute(self._query, self._params(after), binary=True)
        return PendingRead(self, conn, cursor, after, self._query)

    def _params(self, after: Position) -> dict[str, Any]:
        return {"txid": str(after.transaction_id), "pos": after.global_position, "limit": self.batch_size}


class PendingRead:
    """A read that was sent, whose rows are not yet events: see the read-ahead in processor.py."""

    __slots__ = ("_cursor", "_query", "_reader", "_single", "after", "conn")

    def __init__(
        self, reader: PartitionReader, conn: Connection, cursor: Cursor[Any], after: Position, query: sql.SQL
    ) -> None:
        self.after = after
        self.conn = conn
        self._cursor = cursor
        self._reader = reader
        self._query = query
        self._single = query is _SINGLE_PARTITION_QUERY

    def next_start(self) -> Position | None:
        """Where the following batch will start if this one is full, else None.

        Converts only the one row that says so, so that the next read can be
        sent before this batch's rows are decoded. A guess that disagrees with
        :meth:`batch` costs only the read-ahead: the caller uses a read-ahead
        only when it starts exactly at the checkpoint the batch committed.
        """
        size = self._reader.batch_size
        rows = self._rows_received()
        # The partitioned read returns at most a batch of ours plus one marker
        # row, ours first (UNION ALL keeps its branches' order), so only a
        # result longer than a batch is full; the single-partition read has
        # no marker.
        if rows < size or (not self._single and rows <= size):
            return None
        self._cursor.scroll(size - 1, "absolute")
        try:
            row = self._cursor.fetchone()
        except psycopg.DataError as e:
            if not lenient_timestamps.loading_failed(e):
                raise
            row = None  # an unreadable created_at (lenient_timestamps.py): batch() reads the rows again
        self._cursor.scroll(0, "absolute")
        if row is None or not (self._single or row[9]):
            return None
        return Position(int(row[1]), row[0])

    def batch(self) -> Batch:
        after, size, to_event = self.after, self._reader.batch_size, recorded_event_from_row
        try:
            rows = self._cursor.fetchall()
        except psycopg.DataError as e:
            if not lenient_timestamps.loading_failed(e):
                raise
            rows, to_event = self._read_again_tolerantly(), lenient_timestamps.event_from_row
        if not rows:
            return Batch([], None, False)
        if self._single:
            events = [to_event(row) for row in rows]
            self._reader.rows_fetched += len(events)
            return Batch(events, _position_of(events[-1]), len(rows) >= size)
        # Rows are in recorded_event_from_row's column order with "mine" last, which it
        # ignores: no per-row slicing on the hot path.
        events = [to_event(row) for row in rows if row[9]]
        self._reader.rows_fetched += len(events)
        if len(events) >= size:
            # More of ours may follow: stop at the last one read.
            return Batch(events, _position_of(events[-1]), True)
        # Every row of ours up to the newest visible row has been read; the
        # marker is missing only when no row at all is visible.
        marker = next((row for row in rows if not row[9]), None)
        head = None if marker is None else Position(int(marker[1]), marker[0])
        if head is None or head <= after:
            if not events:
                return Batch([], None, False)
            # Unreachable while the marker is the newest visible row; kept safe.
            return Batch(events, _position_of(events[-1]), False)
        return Batch(events, head, False)

    def _read_again_tolerantly(self) -> list[Any]:
        # Same query, same start: the rows may differ if the horizon moved,
        # which is as good as any read from this position.
        self.discard()
        self._cursor = lenient_timestamps.tolerant_cursor(self.conn)
        self._cursor.execute(self._query, self._reader._params(self.after), binary=True)
        return self._cursor.fetchall()

    def discard(self) -> None:
        """Drop a read-ahead that will not be used, still counting the event rows it received."""
        rows = self._rows_received()
        self._reader.rows_fetched += rows if self._single or rows == 0 else rows - 1
        self._cursor.close()

    def _rows_received(self) -> int:
        result = self._cursor.pgresult
        return 0 if result is None else result.ntuples


def _position_of(event: RecordedEvent) -> Position:
    return Position(event.transaction_id, event.global_position)


def _rendered(query: sql.SQL | sql.Composed) -> sql.SQL:
    """The query as one SQL string, composed once.

    psycopg renders a Composed again on every execute, and the traced cursor
    renders it once more for its span's query text.
    """
    if isinstance(query, sql.SQL):
        return query
    return sql.SQL(query.as_string())
