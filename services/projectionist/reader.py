"""The gap-safe, partition-filtered read: the one query every worker batch runs.

Two decisions live here.

**Gap safety.** A row is read only when its writing transaction is older than
``pg_snapshot_xmin(pg_current_snapshot())``, the oldest transaction still
running anywhere in the cluster. Every such transaction has ended, so no row
can ever appear behind the read position later, however out of order the
appends commit. Rows are read in ``(transaction_id, global_position)`` order,
which is the order of ``events_transaction_position_idx``, and the checkpoint
stores both. Nothing is ever skipped on a timer: a long-running writer stalls
readers (and the oldest-open-transaction gauge shows why) but loses nothing.

**Partition filtering on the server.** The inner query takes a window of the
next rows in index order, with no partition predicate, so the planner always
picks the ordered index scan (a ``partition_hash % N = k`` predicate in the
same query has no statistics, and the planner then switched to a sequential
scan plus sort per batch, which made catch-up quadratic). The outer query keeps
only this worker's rows, so other partitions' rows never cross the wire. One
extra marker row reports where the window ended: when the window holds fewer
of our rows than the batch limit, the checkpoint can jump to the window's end,
past other partitions' rows, so an idle partition never rescans them.
"""

from __future__ import annotations

from dataclasses import dataclass

from psycopg import sql

from projectionist.db import Connection
from projectionist.records import Position, RecordedEvent
from projectionist.store import to_recorded

# Bounds the rows a window materialises on the server when N is large.
MAX_WINDOW = 20_000


@dataclass(frozen=True, slots=True)
class Partition:
    worker_id: int
    total_workers: int

    def __post_init__(self) -> None:
        if self.total_workers < 1 or not 0 <= self.worker_id < self.total_workers:
            raise ValueError(f"invalid partition {self.worker_id}/{self.total_workers}")

    def __str__(self) -> str:
        return f"{self.worker_id}/{self.total_workers}"


@dataclass(frozen=True, slots=True)
class MarkLayer:
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

    ``end`` is ``None`` when nothing new is visible. ``window_full`` says the
    server had more rows than one window, so the caller should read again
    without waiting.
    """

    events: list[RecordedEvent]
    end: Position | None
    window_full: bool


def partition_filter(partition: Partition) -> sql.Composable:
    if partition.total_workers == 1:
        return sql.SQL("true")
    # Literals, not parameters: they are fixed for the worker's life, and this
    # keeps one prepared plan per worker.
    return sql.SQL("w.partition_hash %% {n} = {k}").format(
        n=sql.Literal(partition.total_workers), k=sql.Literal(partition.worker_id)
    )


def skip_filter(layers: tuple[MarkLayer, ...]) -> sql.Composable:
    """Drop rows a retired group already applied (see migrations/0002_rescale.sql)."""
    if not layers:
        return sql.SQL("true")
    rows = sql.SQL(", ").join(
        sql.SQL("({n}, {k}, {tx}::xid8, {pos}::bigint)").format(
            n=sql.Literal(layer.total_workers),
            k=sql.Literal(k),
            tx=sql.Literal(str(mark.transaction_id)),
            pos=sql.Literal(mark.global_position),
        )
        for layer in layers
        for k, mark in enumerate(layer.marks)
    )
    return sql.SQL(
        "NOT EXISTS (SELECT 1 FROM (VALUES {rows}) AS m(n, k, tx, pos)"
        " WHERE w.partition_hash %% m.n = m.k"
        " AND (w.transaction_id, w.global_position) <= (m.tx, m.pos))"
    ).format(rows=rows)


# With one partition and no skip marks every row is ours: no window, no marker.
_SINGLE_PARTITION_QUERY = sql.SQL(
    """
    SELECT true AS mine, e.global_position, e.transaction_id::text AS txid, e.event_id,
           e.aggregate_id, e.aggregate_version, e.event_type, e.payload, e.metadata::text,
           e.created_at
    FROM events e
    WHERE e.transaction_id < pg_snapshot_xmin(pg_current_snapshot())
      AND (e.transaction_id, e.global_position) > (%(txid)s::text::xid8, %(pos)s)
    ORDER BY e.transaction_id, e.global_position
    LIMIT %(limit)s
    """
)


def build_read_query(partition: Partition, layers: tuple[MarkLayer, ...] = ()) -> sql.SQL | sql.Composed:
    if partition.total_workers == 1 and not layers:
        return _SINGLE_PARTITION_QUERY
    # ORDER BY uses the CTE's own columns: the text-cast output column is
    # aliased "txid" so it cannot shadow transaction_id and sort as text.
    return sql.SQL(
        """
        WITH w AS (
            SELECT e.global_position, e.transaction_id, e.partition_hash, e.event_id,
                   e.aggregate_id, e.aggregate_version, e.event_type, e.payload,
                   e.metadata, e.created_at
            FROM events e
            WHERE e.transaction_id < pg_snapshot_xmin(pg_current_snapshot())
              AND (e.transaction_id, e.global_position) > (%(txid)s::text::xid8, %(pos)s)
            ORDER BY e.transaction_id, e.global_position
            LIMIT %(window)s
        )
        (SELECT true AS mine, w.global_position, w.transaction_id::text AS txid, w.event_id,
                w.aggregate_id, w.aggregate_version, w.event_type, w.payload, w.metadata::text,
                w.created_at, NULL::bigint AS window_rows
         FROM w WHERE {filter} AND {skip}
         ORDER BY w.transaction_id, w.global_position
         LIMIT %(limit)s)
        UNION ALL
        (SELECT false, w.global_position, w.transaction_id::text, NULL, NULL, NULL, NULL,
                NULL, NULL, NULL, (SELECT count(*) FROM w)
         FROM w
         ORDER BY w.transaction_id DESC, w.global_position DESC
         LIMIT 1)
        """
    ).format(filter=partition_filter(partition), skip=skip_filter(layers))


class PartitionReader:
    """Reads one partition's batches; holds the composed query so it is built once."""

    def __init__(self, partition: Partition, batch_size: int, layers: tuple[MarkLayer, ...] = ()) -> None:
        self.partition = partition
        self.batch_size = batch_size
        self.window = min(MAX_WINDOW, max(batch_size, batch_size * partition.total_workers))
        self.layers = layers
        self._query: sql.SQL | sql.Composed = build_read_query(partition, layers)
        #: Event rows received from the server; each read also gets one marker row.
        self.rows_fetched = 0

    def forget_passed_marks(self, position: Position) -> None:
        """Once past every mark the filter can never match again: drop it from the query."""
        if self.layers and all(position >= layer.highest for layer in self.layers):
            self.layers = ()
            self._query = build_read_query(self.partition)

    def read(self, conn: Connection, after: Position) -> Batch:
        rows = conn.execute(
            self._query,
            {
                "txid": str(after.transaction_id),
                "pos": after.global_position,
                "window": self.window,
                "limit": self.batch_size,
            },
        ).fetchall()
        if not rows:
            return Batch([], None, False)
        if self._query is _SINGLE_PARTITION_QUERY:
            events = [to_recorded(row[1:10]) for row in rows]
            self.rows_fetched += len(events)
            last = events[-1]
            return Batch(
                events, Position(last.transaction_id, last.global_position), len(rows) >= self.batch_size
            )
        events = [to_recorded(row[1:10]) for row in rows if row[0]]
        marker = next(row for row in rows if not row[0])
        self.rows_fetched += len(events)
        window_full = marker[10] >= self.window
        if len(events) >= self.batch_size:
            # More of ours may remain inside the window: stop at the last one read.
            last = events[-1]
            return Batch(events, Position(last.transaction_id, last.global_position), True)
        return Batch(events, Position(int(marker[2]), marker[1]), window_full)
