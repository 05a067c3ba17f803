"""Poison events: the dead-letter table, and what workers and operators do with it.

Policy ``park`` moves a failing event here, and every later event of its
aggregate behind it, so per-aggregate order holds and nothing is skipped
silently; policy ``stop`` never writes here.
"""

from __future__ import annotations

import traceback as tb
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg import sql

from projectionist.errors import ConfigError
from projectionist.partitioning import Partition
from projectionist.records import RecordedEvent
from projectionist.store.connection import NOTIFY_CHANNEL, Connection


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: int
    projection: str
    event_id: str
    global_position: int
    aggregate_id: str
    aggregate_version: int
    event_type: str
    reason: str
    status: str
    attempts: int
    error: str | None
    traceback: str | None
    parked_at: datetime


_COLUMNS = (
    "id, projection_name, event_id::text, global_position, aggregate_id, aggregate_version, "
    "event_type, reason, status, attempts, error, traceback, parked_at"
)


def park(
    conn: Connection,
    projection: str,
    event: RecordedEvent,
    partition_hash: int,
    *,
    error: BaseException | None,
    attempts: int,
) -> None:
    """Park ``event`` inside the batch transaction (``error`` None: blocked behind another)."""
    conn.execute(
        "INSERT INTO dead_letters (projection_name, event_id, global_position, aggregate_id, "
        "aggregate_version, partition_hash, event_type, reason, attempts, error, traceback) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
        "ON CONFLICT (projection_name, event_id) DO UPDATE SET status = 'parked', "
        "attempts = dead_letters.attempts + excluded.attempts, error = excluded.error, "
        "traceback = excluded.traceback, updated_at = now()",
        (
            projection,
            event.event_id,
            event.global_position,
            event.aggregate_id,
            event.aggregate_version,
            partition_hash,
            event.event_type,
            "failed" if error is not None else "blocked",
            attempts,
            repr(error) if error is not None else None,
            "".join(tb.format_exception(error)) if error is not None else None,
        ),
    )


@dataclass(frozen=True, slots=True)
class OpenLetters:
    """The open (parked or retry) letters of one partition, read at the start of a batch."""

    blocked_aggregates: frozenset[str]
    retry: tuple[DeadLetter, ...]


def open_letters(conn: Connection, projection: str, partition: Partition) -> OpenLetters:
    """Lock and read this partition's open letters for the batch.

    FOR UPDATE makes a concurrent ``dead-letters retry|discard`` wait for the
    batch (and the batch wait for it), so an aggregate is never unblocked
    between the moment the batch decides to park its next event and the
    moment that event is parked.
    """
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM dead_letters "
        "WHERE projection_name = %s AND status IN ('parked', 'retry') "
        "AND partition_hash %% %s = %s ORDER BY aggregate_id, aggregate_version FOR UPDATE",
        (projection, partition.total_workers, partition.worker_id),
    ).fetchall()
    letters = [DeadLetter(*r) for r in rows]
    retry_aggregates = {
        letter.aggregate_id
        for letter in letters
        if letter.status == "retry"
        and all(other.status == "retry" for other in letters if other.aggregate_id == letter.aggregate_id)
    }
    return OpenLetters(
        blocked_aggregates=frozenset(letter.aggregate_id for letter in letters),
        retry=tuple(letter for letter in letters if letter.aggregate_id in retry_aggregates),
    )


def resolve(conn: Connection, letter_id: int) -> None:
    conn.execute(
        "UPDATE dead_letters SET status = 'resolved', attempts = attempts + 1, updated_at = now() "
        "WHERE id = %s",
        (letter_id,),
    )


def repark(conn: Connection, letter_id: int, error: BaseException) -> None:
    conn.execute(
        "UPDATE dead_letters SET status = 'parked', attempts = attempts + 1, error = %s, "
        "traceback = %s, updated_at = now() WHERE id = %s",
        (repr(error), "".join(tb.format_exception(error)), letter_id),
    )


def list_letters(
    conn: Connection, projection: str | None = None, *, include_closed: bool = False
) -> list[DeadLetter]:
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM dead_letters "
        "WHERE (%s::text IS NULL OR projection_name = %s) "
        "AND (%s OR status IN ('parked', 'retry')) ORDER BY id",
        (projection, projection, include_closed),
    ).fetchall()
    return [DeadLetter(*r) for r in rows]


def get_letter(conn: Connection, letter_id: int) -> DeadLetter | None:
    row = conn.execute(f"SELECT {_COLUMNS} FROM dead_letters WHERE id = %s", (letter_id,)).fetchone()
    return DeadLetter(*row) if row else None


def request_retry(conn: Connection, letter_id: int) -> int:
    """Ask the owning worker to re-apply this letter's aggregate, in order. Returns letters queued."""
    with conn.transaction():
        letter = get_letter(conn, letter_id)
        if letter is None:
            raise ConfigError(f"dead letter {letter_id} does not exist")
        if letter.status not in ("parked", "retry"):
            raise ConfigError(f"dead letter {letter_id} is {letter.status}, not open; nothing to retry")
        # Every open letter of the aggregate goes back together: retrying only
        # a later one would apply it before the earlier ones.
        # Lock them first, in a statement of its own. A batch that is parking
        # this aggregate's next event holds these rows (open_letters), so this
        # waits for it to commit; the UPDATE below then takes a new snapshot
        # that includes the letter it added. A lone UPDATE would wait too, but
        # READ COMMITTED re-checks only the rows of its older snapshot: the
        # new letter would stay 'parked', and a partly retried aggregate is
        # never retried (open_letters). Later batches wait for our commit.
        # Version order, as open_letters locks them: no deadlock with a batch.
        conn.execute(
            "SELECT id FROM dead_letters WHERE projection_name = %s AND aggregate_id = %s "
            "AND status IN ('parked', 'retry') ORDER BY aggregate_version FOR UPDATE",
            (letter.projection, letter.aggregate_id),
        )
        cur = conn.execute(
            "UPDATE dead_letters SET status = 'retry', updated_at = now() "
            "WHERE projection_name = %s AND aggregate_id = %s AND status = 'parked'",
            (letter.projection, letter.aggregate_id),
        )
        # Wake the workers now rather than at their next poll.
        conn.execute(sql.SQL("NOTIFY {}").format(sql.Identifier(NOTIFY_CHANNEL)))
        return cur.rowcount


def discard(conn: Connection, letter_id: int) -> None:
    """Give up on one event for good; it stays in the table as 'discarded'."""
    with conn.transaction():
        cur = conn.execute(
            "UPDATE dead_letters SET status = 'discarded', updated_at = now() "
            "WHERE id = %s AND status IN ('parked', 'retry')",
            (letter_id,),
        )
        if cur.rowcount != 1:
            raise ConfigError(f"dead letter {letter_id} does not exist or is not open")


def stats(conn: Connection, projections: Sequence[str]) -> dict[str, tuple[int, float]]:
    """Per projection: (open letters, age in seconds of the oldest), 0 and 0.0 when none."""
    found = {
        r[0]: (int(r[1]), float(r[2]))
        for r in conn.execute(
            "SELECT projection_name, count(*), extract(epoch FROM now() - min(parked_at))::float8 "
            "FROM dead_letters WHERE projection_name = ANY(%s) AND status IN ('parked', 'retry') "
            "GROUP BY 1",
            (list(projections),),
        )
    }
    return {p: found.get(p, (0, 0.0)) for p in projections}


_EVENT_OF = sql.SQL("SELECT payload, metadata FROM events WHERE event_id = %s::uuid")


def event_of(conn: Connection, letter: DeadLetter) -> tuple[Any, Any] | None:
    """The parked event's payload and metadata, or ``None`` if it is gone from the store."""
    row = conn.execute(_EVENT_OF, (letter.event_id,)).fetchone()
    return (row[0], row[1]) if row else None
