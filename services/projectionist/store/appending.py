"""Appending to the event store, with optimistic concurrency.

Appends run in ``conn.transaction()``, a savepoint inside a caller's open
transaction, so events commit with the caller's other writes and a conflict
rolls back only the append. Why the statements look as they do:
``docs/design/append-path.md``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import psycopg
from psycopg import errors as pg_errors
from psycopg import sql
from psycopg.pq import ExecStatus, TransactionStatus
from psycopg.pq.abc import PGresult
from psycopg.types.json import Json

from projectionist.errors import ConcurrencyError
from projectionist.partitioning import fnv1a_32
from projectionist.records import (
    ANY,
    NO_STREAM,
    AppendResult,
    ExpectedVersion,
    NewEvent,
)
from projectionist.store import doorbell
from projectionist.store.connection import NOTIFY_CHANNEL, AsyncConnection, Connection
from projectionist.store.trace_context import inject_trace_context

# The hash is pure Python (a loop over the id's bytes), and appends go to the
# same aggregates again and again; raw psycopg in the benchmark caches it too.
_partition_hash = functools.lru_cache(maxsize=65536)(fnv1a_32)

MAX_AGGREGATE_ID_LENGTH = 255


# How often an ANY append re-reads the version after losing a race: the first
# attempt may take the one-statement path, the others the locked path, where a
# loss is only possible against an exact-version writer (which takes no lock).
_ANY_ATTEMPTS = 5
_ONE_STATEMENT_ATTEMPTS = 1


class _Declined(Exception):
    """The one-statement path inserted nothing: the locked path decides, and reports why."""


@dataclass(frozen=True, slots=True)
class StreamAppend:
    """One aggregate's share of a bulk :func:`append_many`."""

    aggregate_id: str
    events: Sequence[NewEvent]
    expected_version: ExpectedVersion = ANY


_CONTROL_CHARACTER = re.compile("[\x00-\x1f\x7f]")


def validate_aggregate_id(aggregate_id: str) -> None:
    if not aggregate_id:
        raise ValueError("aggregate_id must not be empty")
    if len(aggregate_id) > MAX_AGGREGATE_ID_LENGTH:
        raise ValueError(f"aggregate_id is longer than {MAX_AGGREGATE_ID_LENGTH} characters")
    if _CONTROL_CHARACTER.search(aggregate_id):
        raise ValueError("aggregate_id must not contain control characters")


# Appends go to the same aggregates again and again: check each id once (an
# invalid one raises, and is never cached).
@functools.lru_cache(maxsize=65536)
def _validated(aggregate_id: str) -> None:
    validate_aggregate_id(aggregate_id)


# Appends with expected version ANY take a per-aggregate transaction lock
# before reading the version, so concurrent ANY writers to a hot aggregate
# queue up instead of failing and retrying. Locks are taken in sorted order
# (volatile functions run after ORDER BY) so bulk appends cannot deadlock.
# This must be its own statement: in READ COMMITTED a statement's snapshot is
# taken when it starts, so a read in the same statement as the lock wait would
# still see the version from before the previous holder committed.
# The lock serialises writers of one aggregate only, never the whole store.
_LOCK_STREAMS = sql.SQL(
    "SELECT pg_advisory_xact_lock(hashtextextended(id, 0)) FROM unnest(%s::text[]) AS id ORDER BY id"
)

# Current version of each stream, plus the id of the transaction that wrote its
# last event (needed for the ordering guard below), plus whether *our*
# transaction already has an id.
_CURRENT = sql.SQL(
    """
    SELECT a.id, l.aggregate_version, l.transaction_id::text AS last_txid,
           pg_current_xact_id_if_assigned()::text AS own_txid
    FROM unnest(%s::text[]) AS a(id)
    LEFT JOIN LATERAL (
        SELECT e.aggregate_version, e.transaction_id
        FROM events e
        WHERE e.aggregate_id = a.id
        ORDER BY e.aggregate_version DESC
        LIMIT 1
    ) l ON true
    """
)

# One round trip inserts every row and queues one notification (NOTIFY folds
# duplicates within a transaction, and it is delivered only at commit, so a
# worker never wakes for rows it cannot see yet).
_INSERT = sql.SQL(
    """
    WITH ins AS (
        INSERT INTO events (event_id, aggregate_id, aggregate_version, partition_hash,
                            event_type, payload, metadata)
        SELECT r.event_id, r.aggregate_id, r.aggregate_version, r.partition_hash,
               r.event_type, r.payload, r.metadata
        FROM unnest(%b::uuid[], %b::text[], %b::int8[], %b::int8[], %b::text[], %b::json[], %b::json[])
             WITH ORDINALITY AS r(event_id, aggregate_id, aggregate_version, partition_hash,
                                  event_type, payload, metadata, n)
        ORDER BY r.n
        RETURNING global_position, aggregate_id, aggregate_version
    ), notified AS (
        SELECT {notify}
    )
    SELECT ins.global_position, ins.aggregate_id, ins.aggregate_version FROM ins, notified
    """
)


# The fast path, for when the store owns the transaction (an autocommit
# connection with nothing open): one statement reads the current versions,
# checks every expected version, inserts and notifies, so an append is one
# round trip and one implicit transaction. Nothing is inserted when any check
# fails; the rows marked ok = false then name the conflicts. No ordering
# guard is needed: the statement's transaction gets its id at the INSERT,
# after its snapshot saw the previous append committed.
# An ANY append cannot wait for the stream lock here (the snapshot is already
# taken), so it only *tries* it: if another writer holds it, nothing is
# inserted and the retry takes the locked path; if it gets it, it holds it to
# commit, so writers on the locked path queue behind it instead of losing the
# version race to it over and over.
_APPEND_ONE_STATEMENT = sql.SQL(
    """
    WITH wanted AS (
        SELECT x.aggregate_id, x.expected, coalesce(l.aggregate_version, 0) AS version,
               x.expected IS NOT NULL
               OR pg_try_advisory_xact_lock(hashtextextended(x.aggregate_id, 0)) AS locked
        FROM unnest(%s::text[], %s::int8[]) AS x(aggregate_id, expected)
        LEFT JOIN LATERAL (
            SELECT e.aggregate_version FROM events e
            WHERE e.aggregate_id = x.aggregate_id
            ORDER BY e.aggregate_version DESC
            LIMIT 1
        ) l ON true
    ), conflicts AS (
        SELECT w.aggregate_id, w.expected, w.version FROM wanted w
        WHERE w.expected IS NOT NULL AND w.expected <> w.version
        UNION ALL
        SELECT w.aggregate_id, NULL, NULL FROM wanted w WHERE NOT w.locked
    ), ins AS (
        INSERT INTO events (event_id, aggregate_id, aggregate_version, partition_hash,
                            event_type, payload, metadata)
        SELECT r.event_id, r.aggregate_id, w.version + r.version_offset, r.partition_hash,
               r.event_type, r.payload, r.metadata
        FROM unnest(%b::uuid[], %b::text[], %b::int8[], %b::int8[], %b::text[], %b::json[], %b::json[])
             WITH ORDINALITY AS r(event_id, aggregate_id, version_offset, partition_hash,
                                  event_type, payload, metadata, n)
        JOIN wanted w ON w.aggregate_id = r.aggregate_id
        WHERE NOT EXISTS (SELECT 1 FROM conflicts)
        ORDER BY r.n
        RETURNING global_position, aggregate_id, aggregate_version
    ), notified AS (
        SELECT {notify}
    )
    SELECT true AS ok, ins.global_position, ins.aggregate_id, ins.aggregate_version
    FROM ins, notified
    UNION ALL
    SELECT false, c.expected, c.aggregate_id, c.version FROM conflicts c
    """
)


# The same for the common case of a single stream, as one plain INSERT ...
# SELECT: a scalar version lookup, no conflict report. When it inserts nothing
# (the expected version did not match, or an ANY append found the stream lock
# taken) the caller falls back to the locked path, which waits for the lock
# and reports the exact conflict. Conflicts are rare, so reporting them
# costs a second round trip instead of every append carrying the UNION that
# would report them here.
# Only ANY appends try the lock: an exact expected version is its own guard,
# and a race between two of them ends in the unique index.
_CURRENT_VERSION = """(SELECT coalesce((
            SELECT e.aggregate_version FROM events e
            WHERE e.aggregate_id = %(agg)s
            ORDER BY e.aggregate_version DESC
            LIMIT 1
        ), 0) AS version) cur"""
_ONE_STREAM_GUARD = """CASE WHEN %(expected)s::int8 IS NULL
                   THEN pg_try_advisory_xact_lock(hashtextextended(%(agg)s, 0))
                   ELSE cur.version = %(expected)s::int8 END"""
_APPEND_ONE_STREAM = sql.SQL(
    f"""
    {{with_notified}}INSERT INTO events (event_id, aggregate_id, aggregate_version, partition_hash,
                        event_type, payload, metadata)
    SELECT r.event_id, %(agg)s, cur.version + r.n, %(hash)s, r.event_type, r.payload, r.metadata
    FROM unnest(%(ids)b::uuid[], %(types)b::text[], %(payloads)b::json[], %(metas)b::json[])
         WITH ORDINALITY AS r(event_id, event_type, payload, metadata, n),
         {_CURRENT_VERSION}{{notified}}
    WHERE {_ONE_STREAM_GUARD}{{ring}}
    ORDER BY r.n
    RETURNING global_position, aggregate_version
    """
)

# One event to one stream, the commonest append of all, with scalar
# parameters: building and dumping four one-element arrays was most of an
# append's client CPU, and unnest + ordinality a good part of the server's.
_APPEND_ONE_EVENT = sql.SQL(
    f"""
    {{with_notified}}INSERT INTO events (event_id, aggregate_id, aggregate_version, partition_hash,
                        event_type, payload, metadata)
    SELECT %(id)s, %(agg)s, cur.version + 1, %(hash)s, %(type)s, %(payload)s, %(meta)s
    FROM {_CURRENT_VERSION}{{notified}}
    WHERE {_ONE_STREAM_GUARD}{{ring}}
    RETURNING global_position, aggregate_version
    """
)


# How an append wakes the workers (the ``notify`` argument):
# - None, the default: only while a worker sleeps (doorbell.py). Busy workers
#   poll, so under write load no append sends a NOTIFY.
# - True: a NOTIFY in every append transaction. Exact (delivered at commit,
#   never before the rows are visible), but PostgreSQL serialises the commits
#   of all notifying transactions, WAL flush included, which more than halves
#   the throughput of many concurrent small appends.
# - False: never; workers find the events on their next poll, or the caller
#   wakes them (a Notifier poked after commit, notifier.py).
Notify = bool | None
_NOTIFY_MODES: tuple[Notify, ...] = (None, True, False)
_NOTIFY_CALL = sql.SQL("pg_notify({}, '')").format(sql.Literal(NOTIFY_CHANNEL))


def _with_notify(template: sql.SQL, notify: Notify) -> sql.Composed:
    if notify is None:
        return template.format(notify=doorbell.RING_IF_SLEEPING)
    return template.format(notify=_NOTIFY_CALL if notify else sql.SQL("1"))


# The one-stream statements have no other CTE, so they drop the notified CTE
# unless they NOTIFY every time: a CTE scan joined to the INSERT's source cost
# about 3% of the server's time for a single-event append (pgbench, 8
# clients). The doorbell goes in the WHERE clause instead; its NOTIFY is an
# InitPlan, evaluated only when a worker sleeps.
def _with_notify_cte(template: sql.SQL, notify: Notify) -> sql.Composed:
    if notify is True:
        return template.format(
            with_notified=sql.SQL("WITH notified AS (SELECT {})\n    ").format(_NOTIFY_CALL),
            notified=sql.SQL(", notified"),
            ring=sql.SQL(""),
        )
    ring = sql.SQL("\n      AND {}").format(doorbell.RING_IF_SLEEPING) if notify is None else sql.SQL("")
    return template.format(with_notified=sql.SQL(""), notified=sql.SQL(""), ring=ring)


def _rendered(statement: sql.Composed) -> bytes:
    """Rendered once, as bytes: composing the statement again on every append
    cost ~6% of an append's client CPU, and a str or SQL object is encoded
    again on every execute."""
    return statement.as_string().encode()


# The arrays go as binary (%b): dumping them as text arrays was over half of
# an append's client CPU.
_INSERTS = {notify: _rendered(_with_notify(_INSERT, notify)) for notify in _NOTIFY_MODES}
_ONE_STATEMENT_APPENDS = {
    notify: _rendered(_with_notify(_APPEND_ONE_STATEMENT, notify)) for notify in _NOTIFY_MODES
}
_ONE_STREAM_APPENDS = {
    notify: _rendered(_with_notify_cte(_APPEND_ONE_STREAM, notify)) for notify in _NOTIFY_MODES
}
_ONE_EVENT_APPENDS = {
    notify: _rendered(_with_notify_cte(_APPEND_ONE_EVENT, notify)) for notify in _NOTIFY_MODES
}


def append(
    conn: Connection,
    aggregate_id: str,
    events: Sequence[NewEvent],
    *,
    expected_version: ExpectedVersion = ANY,
    correlation_id: str | None = None,
    causation_id: str | None = None,
    notify: Notify = None,
) -> AppendResult:
    """Append ``events`` to one aggregate's stream.

    ``expected_version`` is :data:`ANY`, :data:`NO_STREAM`, or the exact current
    version; a mismatch raises :class:`ConcurrencyError` and writes nothing.

    ``notify`` says how the workers learn of the events. ``None`` (the
    default) sends a NOTIFY only while a worker sleeps waiting for one: busy
    workers poll, and writers pay nothing for them. ``True`` sends a NOTIFY
    in every append transaction, which serialises the commits of concurrent
    appends. ``False`` sends none: workers find the events when they next
    poll, or the caller pokes a :class:`~projectionist.store.notifier.Notifier`.
    """
    return _append_many(
        conn, [StreamAppend(aggregate_id, events, expected_version)], correlation_id, causation_id, notify
    )[0]


def append_many(
    conn: Connection,
    appends: Sequence[StreamAppend],
    *,
    correlation_id: str | None = None,
    causation_id: str | None = None,
    notify: Notify = None,
) -> list[AppendResult]:
    """Append to many aggregates in one transaction (bulk loading). All or nothing."""
    return _append_many(conn, appends, correlation_id, causation_id, notify)


def _append_many(
    conn: Connection,
    appends: Sequence[StreamAppend],
    correlation_id: str | None,
    causation_id: str | None,
    notify: Notify,
) -> list[AppendResult]:
    context, attempts = _prepare(appends, correlation_id, causation_id)
    for attempt in range(attempts):
        try:
            if attempt < _ONE_STATEMENT_ATTEMPTS and _owns_transaction(
                conn.autocommit, conn.pgconn.transaction_status
            ):
                try:
                    return _execute(conn, _plan_fast(appends, context, notify))
                except _Declined:
                    pass
            with _atomic(conn):
                return _execute(conn, _plan_append(appends, context, notify))
        except ConcurrencyError:
            # Under ANY a conflict only means another writer took the version we
            # computed; the savepoint is gone, so re-read and try again.
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


async def append_async(
    conn: AsyncConnection,
    aggregate_id: str,
    events: Sequence[NewEvent],
    *,
    expected_version: ExpectedVersion = ANY,
    correlation_id: str | None = None,
    causation_id: str | None = None,
    notify: Notify = None,
) -> AppendResult:
    """:func:`append` on an asyncio connection: same checks, same SQL, same result."""
    results = await append_many_async(
        conn,
        [StreamAppend(aggregate_id, events, expected_version)],
        correlation_id=correlation_id,
        causation_id=causation_id,
        notify=notify,
    )
    return results[0]


async def append_many_async(
    conn: AsyncConnection,
    appends: Sequence[StreamAppend],
    *,
    correlation_id: str | None = None,
    causation_id: str | None = None,
    notify: Notify = None,
) -> list[AppendResult]:
    """:func:`append_many` on an asyncio connection. All or nothing."""
    context, attempts = _prepare(appends, correlation_id, causation_id)
    for attempt in range(attempts):
        try:
            if attempt < _ONE_STATEMENT_ATTEMPTS and _owns_transaction(
                conn.autocommit, conn.pgconn.transaction_status
            ):
                try:
                    return await _execute_async(conn, _plan_fast(appends, context, notify))
                except _Declined:
                    pass
            if _needs_implicit_begin(conn.autocommit, conn.pgconn.transaction_status):
                await conn.execute("SELECT 1")  # see _atomic
            async with conn.transaction():
                return await _execute_async(conn, _plan_append(appends, context, notify))
        except ConcurrencyError:
            if attempt == attempts - 1:  # see append_many
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def _as_is(data: Any) -> Any:
    return data


#: The metadata of an event with none of its own, appended with no trace context
#: and no ids: dumped once, not once per event (a json.dumps per event was
#: about a tenth of a bulk append's client CPU).
_EMPTY_METADATA = Json(b"{}", dumps=_as_is)


@dataclass(frozen=True, slots=True)
class _Context:
    """The metadata every event of one append gets (trace context, correlation and causation ids)."""

    fields: dict[str, Any]
    dumped: Json

    def metadata(self, event: NewEvent) -> Json:
        if not event.metadata:
            return self.dumped
        return Json({**self.fields, **event.metadata})


_NO_CONTEXT = _Context({}, _EMPTY_METADATA)


def _prepare(
    appends: Sequence[StreamAppend], correlation_id: str | None, causation_id: str | None
) -> tuple[_Context, int]:
    """Validate the request; return the metadata every event gets and how many attempts to make."""
    if len(appends) > 1 and len({a.aggregate_id for a in appends}) != len(appends):
        raise ValueError("append_many got the same aggregate_id twice; merge its events")
    retry_any = True
    for a in appends:
        _validated(a.aggregate_id)
        if not a.events:
            raise ValueError(f"no events to append to {a.aggregate_id!r}")
        if a.expected_version is not ANY:
            retry_any = False
            if isinstance(a.expected_version, int) and a.expected_version < 0:
                raise ValueError(f"expected_version must be >= 0, got {a.expected_version}")
    fields = inject_trace_context()
    if correlation_id is not None:
        fields["correlation_id"] = correlation_id
    if causation_id is not None:
        fields["causation_id"] = causation_id
    context = _Context(fields, Json(json.dumps(fields).encode(), dumps=_as_is)) if fields else _NO_CONTEXT
    return context, _ANY_ATTEMPTS if retry_any else 1


def _columns(
    appends: Sequence[StreamAppend], context: _Context, versions: Mapping[str, int] | None
) -> tuple[list[Any], ...]:
    """The INSERT's arrays: event ids, aggregate ids, versions, hashes, types, payloads, metadata.

    ``versions`` gives each stream's current version; without it the third
    array holds each event's offset in its stream (1, 2, ...), which the
    one-statement append adds to the version it reads itself.
    """
    ids: list[Any] = []
    aggregates: list[str] = []
    numbers: list[int] = []
    hashes: list[int] = []
    types: list[str] = []
    payloads: list[Json] = []
    metadata: list[Json] = []
    for a in appends:
        events, n = a.events, len(a.events)
        base = versions[a.aggregate_id] if versions is not None else 0
        ids += [e.event_id for e in events]
        aggregates += [a.aggregate_id] * n
        numbers += range(base + 1, base + n + 1)
        hashes += [_partition_hash(a.aggregate_id)] * n
        types += [e.type for e in events]
        payloads += [Json(e.payload) for e in events]
        metadata += [context.metadata(e) for e in events]
    return ids, aggregates, numbers, hashes, types, payloads, metadata


def _owns_transaction(autocommit: bool, status: int) -> bool:
    """Nothing is open on an autocommit connection: one statement is the whole transaction."""
    return autocommit and status == TransactionStatus.IDLE


def _needs_implicit_begin(autocommit: bool, status: int) -> bool:
    return not autocommit and status == TransactionStatus.IDLE


@contextlib.contextmanager
def _atomic(conn: Connection) -> Iterator[None]:
    """Our own transaction in autocommit mode, else a savepoint in the caller's.

    A DB-API style (non-autocommit) connection expects the caller to commit,
    but psycopg's ``transaction()`` on an idle one commits at the end of the
    block. Opening the implicit transaction first turns the block into a
    savepoint, so the caller's ``commit()`` decides.
    """
    if _needs_implicit_begin(conn.autocommit, conn.pgconn.transaction_status):
        conn.execute("SELECT 1")
    with conn.transaction():
        yield


# The append is written once, as a plan: a generator that yields each statement
# to run and is sent back its rows (or thrown the database error it raised).
# The sync and asyncio executors below only run statements, so both paths take
# the same locks, make the same checks and build the same rows.
class _Statement(NamedTuple):
    query: sql.SQL | bytes
    params: Sequence[Any] | Mapping[str, Any]


_Rows = list[tuple[Any, ...]]
_Plan = Generator[_Statement, _Rows, list[AppendResult]]


def _has_rows(result: PGresult | None) -> bool:
    # Not cursor.description: that builds a Column object per column on every
    # call, about 8% of a single-event append's client CPU.
    return result is not None and result.status == ExecStatus.TUPLES_OK


def _execute(conn: Connection, plan: _Plan) -> list[AppendResult]:
    try:
        step = next(plan)
        while True:
            try:
                cur = conn.execute(step.query, step.params)
                rows = cur.fetchall() if _has_rows(cur.pgresult) else []
            except psycopg.Error as e:
                step = plan.throw(e)
            else:
                step = plan.send(rows)
    except StopIteration as done:
        result: list[AppendResult] = done.value
        return result


async def _execute_async(conn: AsyncConnection, plan: _Plan) -> list[AppendResult]:
    try:
        step = next(plan)
        while True:
            try:
                cur = await conn.execute(step.query, step.params)
                rows = await cur.fetchall() if _has_rows(cur.pgresult) else []
            except psycopg.Error as e:
                step = plan.throw(e)
            else:
                step = plan.send(rows)
    except StopIteration as done:
        result: list[AppendResult] = done.value
        return result


def _plan_append(appends: Sequence[StreamAppend], context: _Context, notify: Notify) -> _Plan:
    unversioned = [a.aggregate_id for a in appends if a.expected_version is ANY]
    if unversioned:
        yield _Statement(_LOCK_STREAMS, (unversioned,))
    current: dict[str, tuple[int, int | None]] = {}
    own_txid: int | None = None
    for agg, version, last_txid, own in (yield _Statement(_CURRENT, ([a.aggregate_id for a in appends],))):
        current[agg] = (version or 0, int(last_txid) if last_txid is not None else None)
        own_txid = int(own) if own is not None else None

    for a in appends:
        version, last_txid = current[a.aggregate_id]
        _check_expected(a, version)
        # Ordering guard. Readers apply events in (transaction_id, position)
        # order. If the caller's transaction already took its id before the
        # stream's last append committed, our events would sort *before* that
        # append and be applied out of order. A transaction that gets its id
        # at our INSERT (the normal case) always sorts after, so only this
        # case needs a check.
        if own_txid is not None and last_txid is not None and last_txid > own_txid:
            raise ConcurrencyError(
                a.aggregate_id,
                a.expected_version,
                version,
                "the enclosing transaction wrote before the stream's last append committed; "
                "retry in a new transaction",
            )

    columns = _columns(appends, context, {agg: version for agg, (version, _) in current.items()})
    try:
        rows = yield _Statement(_INSERTS[notify], columns)
    except pg_errors.UniqueViolation as e:
        raise _unique_violation(e, appends) from e
    except pg_errors.DeadlockDetected as e:
        # Streams with an exact expected version take no lock, so two bulk
        # appends that insert the same versions in opposite orders wait on
        # each other's index entries. Both expected the same versions, so at
        # most one could succeed: the server aborted this one.
        raise _deadlock(appends) from e
    return _results(appends, rows)


def _plan_fast(appends: Sequence[StreamAppend], context: _Context, notify: Notify) -> _Plan:
    if len(appends) == 1:
        return _plan_one_stream(appends[0], context, notify)
    return _plan_one_statement(appends, context, notify)


def _plan_one_stream(a: StreamAppend, context: _Context, notify: Notify) -> _Plan:
    query, params = _one_stream_statement(a, context, notify)
    try:
        rows = yield _Statement(query, params)
    except pg_errors.UniqueViolation as e:
        raise _unique_violation(e, [a]) from e
    if not rows:
        raise _Declined
    if len(rows) == 1:
        ((position, version),) = rows
        return [AppendResult(a.aggregate_id, version, (position,))]
    return _results([a], [(position, a.aggregate_id, version) for position, version in rows])


def _one_stream_statement(a: StreamAppend, context: _Context, notify: Notify) -> tuple[bytes, dict[str, Any]]:
    params: dict[str, Any] = {
        "agg": a.aggregate_id,
        "expected": _expected_number(a.expected_version),
        "hash": _partition_hash(a.aggregate_id),
    }
    if len(a.events) == 1:
        e = a.events[0]
        params["id"] = e.event_id
        params["type"] = e.type
        params["payload"] = Json(e.payload)
        params["meta"] = context.metadata(e)
        return _ONE_EVENT_APPENDS[notify], params
    params["ids"] = [e.event_id for e in a.events]
    params["types"] = [e.type for e in a.events]
    params["payloads"] = [Json(e.payload) for e in a.events]
    params["metas"] = [context.metadata(e) for e in a.events]
    return _ONE_STREAM_APPENDS[notify], params


def _plan_one_statement(appends: Sequence[StreamAppend], context: _Context, notify: Notify) -> _Plan:
    columns = _columns(appends, context, None)
    expected = [_expected_number(a.expected_version) for a in appends]
    try:
        rows = yield _Statement(
            _ONE_STATEMENT_APPENDS[notify], ([a.aggregate_id for a in appends], expected, *columns)
        )
    except pg_errors.DeadlockDetected as e:
        raise _Declined from e  # see _plan_append; the locked path re-reads and reports the conflict
    except pg_errors.UniqueViolation as e:
        error = _unique_violation(e, appends)
        if isinstance(error, ConcurrencyError) and error.expected is ANY:
            raise _Declined from e  # an ANY stream lost a race: the locked path waits and decides
        raise error from e
    conflicts = [(agg, version) for ok, _, agg, version in rows if not ok]
    for agg, version in conflicts:
        if version is not None:
            raise ConcurrencyError(agg, _expected_of(appends, agg), version)
    if conflicts:
        raise _Declined  # only ANY streams whose lock was taken: the locked path waits for it
    return _results(appends, [(position, agg, version) for _, position, agg, version in rows])


def _expected_number(expected: ExpectedVersion) -> int | None:
    if expected is ANY:
        return None
    if expected is NO_STREAM:
        return 0
    assert isinstance(expected, int)
    return expected


def _unique_violation(e: pg_errors.UniqueViolation, appends: Sequence[StreamAppend]) -> Exception:
    constraint = e.diag.constraint_name or ""
    if "event_id" in constraint:
        return ValueError(f"an event id was already stored: {e.diag.message_detail}")
    agg = _conflicting_aggregate(e, appends)
    return ConcurrencyError(agg, _expected_of(appends, agg), None, "a concurrent append took the version")


def _deadlock(appends: Sequence[StreamAppend]) -> ConcurrencyError:
    exact = [a for a in appends if a.expected_version is not ANY] or list(appends)
    return ConcurrencyError(
        exact[0].aggregate_id,
        exact[0].expected_version,
        None,
        "a concurrent append to the same streams took the versions first (deadlock)",
    )


def _results(appends: Sequence[StreamAppend], rows: Sequence[tuple[int, str, int]]) -> list[AppendResult]:
    positions: dict[str, list[int]] = {a.aggregate_id: [] for a in appends}
    last_version: dict[str, int] = {}
    for position, agg, version in sorted(rows):
        positions[agg].append(position)
        last_version[agg] = version
    return [
        AppendResult(a.aggregate_id, last_version[a.aggregate_id], tuple(positions[a.aggregate_id]))
        for a in appends
    ]


def _check_expected(a: StreamAppend, version: int) -> None:
    expected = a.expected_version
    if expected is ANY:
        return
    if expected is NO_STREAM:
        ok = version == 0
    else:
        assert isinstance(expected, int)
        ok = version == expected
    if not ok:
        raise ConcurrencyError(a.aggregate_id, expected, version)


def _expected_of(appends: Sequence[StreamAppend], agg: str) -> ExpectedVersion:
    for a in appends:
        if a.aggregate_id == agg:
            return a.expected_version
    return ANY


def _conflicting_aggregate(e: psycopg.Error, appends: Sequence[StreamAppend]) -> str:
    # detail reads: Key (aggregate_id, aggregate_version)=(order-7, 3) already exists.
    # Matched whole, up to the version: a prefix test would take "a" for "a, 1".
    detail = e.diag.message_detail or ""
    for a in appends:
        if re.search(re.escape(f"=({a.aggregate_id}, ") + r"\d+\) already exists", detail):
            return a.aggregate_id
    return appends[0].aggregate_id
