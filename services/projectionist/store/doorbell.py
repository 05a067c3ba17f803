"""The doorbell: appends send a NOTIFY only while a worker sleeps waiting for one.

A worker going to sleep holds an advisory lock (the doorbell); an append takes
it in shared mode or, when a sleeper holds it, sends NOTIFY instead. So busy
workers cost writers nothing. Why: ``docs/design/notifications.md``.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

from psycopg import sql

from projectionist.records import Position
from projectionist.store.connection import NOTIFY_CHANNEL, Connection

# The doorbell's key, in the two-int4 form (pg_locks: objsubid = 2, classid =
# 1886546542, objid = 2003872613, "prjn" and "wake"). Per-aggregate append
# locks use the one-bigint form, a different key space, so no aggregate can
# share it; partition ownership uses this form with the partition number as
# the second key, which never comes near 2003872613.
KEY = (1886546542, 2003872613)
_KEY = sql.SQL("{}, {}").format(sql.Literal(KEY[0]), sql.Literal(KEY[1]))
_NOTIFY = sql.SQL("pg_notify({}, '')").format(sql.Literal(NOTIFY_CHANNEL))

#: What an append evaluates, once, in its transaction: true without a NOTIFY
#: while no worker sleeps; else the NOTIFY, delivered at commit.
#:
#: Why no sleeper goes unwoken: the shared lock is held until the append's
#: transaction ends, and a worker takes the doorbell (exclusive) only when no
#: append holds it, then reads once more. Every append either finished before
#: that read, so the read sees its rows, or found the doorbell taken and
#: notified. The EXISTS is an InitPlan, evaluated only when the OR needs it.
RING_IF_SLEEPING = sql.SQL(
    "(pg_try_advisory_xact_lock_shared({key}) OR EXISTS (SELECT FROM {notify}))"
).format(key=_KEY, notify=_NOTIFY)

#: The worker's side, in one statement. The nested CASE fixes the order: take
#: the doorbell; else find out whether appends hold it (a shared lock we can
#: get, and give back at once) or another sleeper does (we cannot).
_TRY_TO_SLEEP = sql.SQL(
    """
    SELECT CASE WHEN pg_try_advisory_lock({key}) THEN 'holder'
                WHEN pg_try_advisory_lock_shared({key})
                THEN CASE WHEN pg_advisory_unlock_shared({key}) THEN 'appending' END
                ELSE 'another sleeper' END
    """
).format(key=_KEY)
#: The payload of a leaving worker's ring, so that the sleepers it wakes can
#: tell a peer's relay from an append's NOTIFY (whose payload is empty).
RELAY = "relay"
_RELAY = sql.SQL("pg_notify({}, {})").format(sql.Literal(NOTIFY_CHANNEL), sql.Literal(RELAY))
_LEAVE = sql.SQL("SELECT pg_advisory_unlock({key})").format(key=_KEY)
_LEAVE_AND_RING = sql.SQL("SELECT pg_advisory_unlock({key}), {relay}").format(key=_KEY, relay=_RELAY)

_SLEEPING = sql.SQL(
    """
    SELECT EXISTS (
        SELECT 1 FROM pg_locks
        WHERE locktype = 'advisory' AND mode = 'ExclusiveLock' AND granted AND objsubid = 2
          AND classid = {k1} AND objid = {k2}
          AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
    )
    """
).format(k1=sql.Literal(KEY[0]), k2=sql.Literal(KEY[1]))

# A worker's look for news, in one round trip instead of a batch's four.
# visible: rows past the checkpoint that the gap-safe read would return now.
# hidden: committed rows past it that the read fence (an older transaction
# still open) hides; their appends will not ring again. Both are index range
# scans on (transaction_id, global_position), the fence its upper bound. They
# are scalar subqueries with ORDER BY ... LIMIT 1, not EXISTS: PostgreSQL drops
# the ordering from an EXISTS, and then guesses that a third of the table lies
# past the checkpoint and scans all of it, a cost that grows with the store
# (3 ms at 30,000 events).
_LOOK = sql.SQL(
    """
    SELECT (SELECT 1 FROM events
             WHERE transaction_id < pg_snapshot_xmin(pg_current_snapshot())
               AND (transaction_id, global_position) > (%(txid)s::text::xid8, %(pos)s)
             ORDER BY transaction_id, global_position LIMIT 1) IS NOT NULL,
           (SELECT 1 FROM events
             WHERE (transaction_id, global_position) > (%(txid)s::text::xid8, %(pos)s)
             ORDER BY transaction_id, global_position LIMIT 1) IS NOT NULL
    """
)


class Look(NamedTuple):
    """What a worker's look found past its checkpoint."""

    visible: bool
    """Rows the gap-safe read would return now: time for a batch."""
    hidden: bool
    """Committed rows the read fence still hides (an older transaction is open)."""


class Turn(enum.Enum):
    """What a worker found when it tried to take the doorbell."""

    #: It holds the doorbell now: every append NOTIFYs until it leaves.
    HOLDER = "holder"
    #: Another sleeping worker holds it, so appends NOTIFY, which wakes every listener.
    ANOTHER_SLEEPER = "another sleeper"
    #: Appends hold it, uncommitted: their rows are on their way, so it must not sleep yet.
    APPENDING = "appending"


def try_to_sleep(conn: Connection) -> Turn:
    """Take the doorbell if nobody holds it (on an autocommit connection that LISTENs already)."""
    row = conn.execute(_TRY_TO_SLEEP).fetchone()
    assert row is not None
    return Turn(row[0])


def leave(conn: Connection, *, ring: bool) -> None:
    """Give the doorbell back. ``ring`` wakes the other sleepers, who relied on it being held."""
    conn.execute(_LEAVE_AND_RING if ring else _LEAVE)


def sleeping(conn: Connection) -> bool:
    """Whether a worker of this database sleeps behind the doorbell, so that appends NOTIFY."""
    row = conn.execute(_SLEEPING).fetchone()
    return bool(row and row[0])


def look(conn: Connection, after: Position) -> Look:
    """Whether events past ``after`` are visible to the gap-safe read, or committed but fenced."""
    row = conn.execute(_LOOK, {"txid": str(after.transaction_id), "pos": after.global_position}).fetchone()
    assert row is not None
    visible, committed = row
    return Look(bool(visible), bool(committed) and not visible)
