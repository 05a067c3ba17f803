"""Partition indexes: one partial index per partition, so a worker reads only its own rows.

``events_partition_<N>_<k>_idx`` holds partition k of N's rows in read order;
they are built concurrently, and a worker uses its own once it is valid and
the table has statistics. Why partial indexes: ``docs/design/partition-indexes.md``.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from psycopg import sql

from projectionist.consume.ownership import LIVE_WORKERS, group_key
from projectionist.errors import ConfigError
from projectionist.store.connection import Connection

#: Partial indexes a single partition count may have. Every append evaluates
#: the predicate of each, so an unbounded count would tax every write.
MAX_INDEXED_PARTITIONS = 256

#: The one reason that resolves itself: autovacuum analyzes a new table once it has rows.
NO_STATISTICS = "the events table has no planner statistics yet (autovacuum or ANALYZE gathers them)"

_NAME = re.compile(r"^events_partition_(\d+)_(\d+)_idx$")

Progress = Callable[[str], None]

_TRY_BUILDER_LOCK = "SELECT pg_try_advisory_lock(hashtext('projectionist.consume.partition_indexes'))"
_BUILDER_UNLOCK = "SELECT pg_advisory_unlock(hashtext('projectionist.consume.partition_indexes'))"


def index_name(total_workers: int, worker_id: int) -> str:
    return f"events_partition_{total_workers}_{worker_id}_idx"


@dataclass(frozen=True, slots=True)
class PartitionIndex:
    total_workers: int
    worker_id: int
    name: str
    #: False while a concurrent build runs, or after one failed: the planner ignores it.
    valid: bool
    size_bytes: int


def check_total_workers(total_workers: int) -> None:
    if total_workers < 2:
        raise ConfigError(
            "--partitions must be at least 2: a single partition reads every row in order "
            "and needs no partition index"
        )
    if total_workers > MAX_INDEXED_PARTITIONS:
        raise ConfigError(
            f"--partitions must be at most {MAX_INDEXED_PARTITIONS} for partition indexes: "
            "every append evaluates each index's predicate"
        )


def list_indexes(conn: Connection) -> list[PartitionIndex]:
    """Every partition index on the events table, by partition count and partition."""
    rows = conn.execute(
        "SELECT c.relname, i.indisvalid AND i.indisready, pg_relation_size(c.oid) "
        "FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        "WHERE i.indrelid = 'events'::regclass AND c.relname ~ '^events_partition_[0-9]+_[0-9]+_idx$'"
    ).fetchall()
    found = []
    for name, valid, size in rows:
        match = _NAME.match(name)
        assert match is not None  # the query's pattern
        found.append(PartitionIndex(int(match[1]), int(match[2]), name, bool(valid), int(size)))
    return sorted(found, key=lambda x: (x.total_workers, x.worker_id))


@dataclass(frozen=True, slots=True)
class IndexSet:
    """The partition indexes of one partition count, and the groups of that size."""

    total_workers: int
    #: Indexes the planner can use; the set is complete when this equals total_workers.
    valid: int
    size_bytes: int
    groups: tuple[str, ...]


def summarize(conn: Connection) -> list[IndexSet]:
    """One entry per partition count that has indexes or a group (single-partition groups need none)."""
    by_count: dict[int, list[PartitionIndex]] = {}
    for x in list_indexes(conn):
        by_count.setdefault(x.total_workers, []).append(x)
    groups: dict[int, tuple[str, ...]] = {
        int(n): tuple(names)
        for n, names in conn.execute(
            "SELECT total_workers, array_agg(projection_name ORDER BY projection_name)"
            " FROM projection_groups GROUP BY total_workers"
        )
    }
    return [
        IndexSet(
            n,
            sum(x.valid for x in by_count.get(n, [])),
            sum(x.size_bytes for x in by_count.get(n, [])),
            groups.get(n, ()),
        )
        for n in sorted(by_count.keys() | groups.keys())
        if n > 1
    ]


# The two halves of the rule, as SQL: the index is valid, and the table has
# the statistics that keep the plain predicate's plan an ordered scan.
def _valid_index(name: sql.Composable) -> sql.Composed:
    return sql.SQL(
        "EXISTS (SELECT 1 FROM pg_index i WHERE i.indexrelid = to_regclass({})"
        " AND i.indrelid = 'events'::regclass AND i.indisvalid AND i.indisready)"
    ).format(name)


_ANALYZED = sql.SQL(
    "EXISTS (SELECT 1 FROM pg_stats s"
    " JOIN pg_class t ON t.relname = s.tablename"
    " JOIN pg_namespace n ON n.oid = t.relnamespace AND n.nspname = s.schemaname"
    " WHERE t.oid = 'events'::regclass AND s.attname = 'transaction_id')"
)


def has_statistics(conn: Connection) -> bool:
    """Whether the events table has the planner statistics without which no partition index is used."""
    row = conn.execute(sql.SQL("SELECT {}").format(_ANALYZED)).fetchone()
    return bool(row and row[0])


def why_not_ready(conn: Connection, total_workers: int, worker_id: int) -> str | None:
    """Why partition ``worker_id`` of ``total_workers`` cannot read through its index; None if it can."""
    name = index_name(total_workers, worker_id)
    row = conn.execute(
        sql.SQL(
            "SELECT EXISTS (SELECT 1 FROM pg_index i WHERE i.indexrelid = to_regclass({name})"
            " AND i.indrelid = 'events'::regclass), {valid}, {analyzed}"
        ).format(name=sql.Literal(name), valid=_valid_index(sql.Literal(name)), analyzed=_ANALYZED)
    ).fetchone()
    assert row is not None
    if not row[0]:
        return f"there is no index {name}"
    if not row[1]:
        return f"{name} is not valid (being built, or left by a failed build)"
    if not row[2]:
        return NO_STATISTICS
    return None


def ready_condition(total_workers: sql.Composable, worker_id: sql.Composable) -> sql.Composed:
    """SQL that is true when :func:`why_not_ready` would find nothing, for queries that ask per row.

    ``total_workers`` and ``worker_id`` are SQL expressions of the query that
    embeds it. tests/test_partition_index.py checks that the two agree.
    """
    name = sql.SQL("'events_partition_' || {} || '_' || {} || '_idx'").format(total_workers, worker_id)
    return sql.SQL("{} AND {}").format(_valid_index(name), _ANALYZED)


def is_ready(conn: Connection, total_workers: int, worker_id: int) -> bool:
    """Whether partition ``worker_id`` of ``total_workers`` has a valid index and the statistics to use it."""
    return why_not_ready(conn, total_workers, worker_id) is None


def create_indexes(conn: Connection, total_workers: int, progress: Progress = lambda _: None) -> list[str]:
    """Build the missing or invalid indexes of ``total_workers`` partitions; return the names built.

    ``conn`` must be in autocommit mode: ``CREATE INDEX CONCURRENTLY`` cannot
    run inside a transaction. Safe to run again, and safe while workers and
    appends run.
    """
    check_total_workers(total_workers)
    if not conn.autocommit:
        raise ValueError("create_indexes needs an autocommit connection (CREATE INDEX CONCURRENTLY)")
    with _builder_lock(conn, progress):
        return _create_missing(conn, total_workers, progress)


def _create_missing(conn: Connection, total_workers: int, progress: Progress) -> list[str]:
    existing = {(x.total_workers, x.worker_id): x for x in list_indexes(conn)}
    built = []
    for k in range(total_workers):
        name = index_name(total_workers, k)
        found = existing.get((total_workers, k))
        if found is not None and found.valid:
            progress(f"{name}: present ({k + 1} of {total_workers})")
            continue
        if found is not None:
            # An earlier concurrent build failed or was cancelled; its leftover
            # still costs every append and is never used.
            conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(sql.Identifier(name)))
            progress(f"{name}: dropped an invalid earlier build")
        started = time.monotonic()
        conn.execute(
            sql.SQL(
                "CREATE INDEX CONCURRENTLY {} ON events (transaction_id, global_position) "
                "WHERE partition_hash % {} = {}"
            ).format(sql.Identifier(name), sql.Literal(total_workers), sql.Literal(k))
        )
        built.append(name)
        progress(f"{name}: built in {time.monotonic() - started:.1f} s ({k + 1} of {total_workers})")
    if built:
        # A sample of the table, not a scan: quick at any size. See the module docstring.
        conn.execute("ANALYZE events")
        progress("events: analyzed (the planner's statistics for the new indexes)")
    return built


def groups_using(conn: Connection, total_workers: int) -> list[str]:
    """The projections whose worker group has ``total_workers`` partitions."""
    rows = conn.execute(
        "SELECT projection_name FROM projection_groups WHERE total_workers = %s ORDER BY 1", (total_workers,)
    ).fetchall()
    return [str(r[0]) for r in rows]


def live_users(conn: Connection, total_workers: int) -> list[str]:
    """The projections with a running worker of ``total_workers`` partitions."""
    return [
        name
        for name in groups_using(conn, total_workers)
        if conn.execute(LIVE_WORKERS, (group_key(name, total_workers),)).fetchone() is not None
    ]


def drop_indexes(
    conn: Connection, total_workers: int, progress: Progress = lambda _: None, *, force: bool = False
) -> list[str]:
    """Drop the indexes of ``total_workers`` partitions; return the names dropped.

    Refused while a worker of that partition count runs, unless ``force``:
    it would keep the plain filter, which without the index gets the plan
    that sorts the table's remainder under every batch, until its next check
    (every 30 s, processor.INDEX_RECHECK_SECONDS) sends it back to walking
    the main index. Stopped workers check for their index when they start.
    """
    check_total_workers(total_workers)
    if not conn.autocommit:
        raise ValueError("drop_indexes needs an autocommit connection (DROP INDEX CONCURRENTLY)")
    dropped = []
    with _builder_lock(conn, progress):
        # Checked once the lock is ours: waiting for another build may take
        # minutes, and workers may start meanwhile.
        users = live_users(conn, total_workers)
        if users and not force:
            raise ConfigError(
                f"workers of {', '.join(users)} with {total_workers} partitions are running and read "
                "through these indexes; without them each batch would sort the rest of its partition "
                "until the workers notice, within 30 s. Stop them first, or pass --force"
            )
        for found in list_indexes(conn):
            if found.total_workers == total_workers:
                conn.execute(
                    sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(sql.Identifier(found.name))
                )
                dropped.append(found.name)
                progress(f"{found.name}: dropped")
    return dropped


@contextlib.contextmanager
def _builder_lock(conn: Connection, progress: Progress) -> Iterator[None]:
    """One builder at a time, for two deploys that run ``migrate --partitions`` at once.

    Two concurrent index builds on one table deadlock: each waits for the
    other's snapshot to end. Waiting in ``pg_advisory_lock`` would hold a
    snapshot too and deadlock the same way, so the lock is only tried, with
    no statement open between tries.
    """
    waiting = False
    while conn.execute(_TRY_BUILDER_LOCK).fetchone() != (True,):
        if not waiting:
            progress("waiting for another session's partition-index build or drop to end ...")
            waiting = True
        time.sleep(0.2)
    try:
        yield
    finally:
        conn.execute(_BUILDER_UNLOCK)
