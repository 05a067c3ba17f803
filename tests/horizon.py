"""Waiting out the gap-safe read fence in tests that read once."""

from __future__ import annotations

from projectionist.db import Connection
from tests.waiting import wait_for


def wait_until_readable(conn: Connection, timeout: float = 30) -> None:
    """Wait until every committed event is below the read horizon.

    The reader holds back what an older transaction might still precede, and
    xids are cluster-wide: an autoanalyze or another test's session anywhere on
    the server can fence a read taken right after a commit. Workers simply poll
    again; a test that reads once has to wait the same way.
    """

    def readable() -> bool:
        row = conn.execute(
            "SELECT coalesce(max(transaction_id) < pg_snapshot_xmin(pg_current_snapshot()), true) FROM events"
        ).fetchone()
        return bool(row and row[0])

    wait_for(readable, "committed events to pass the read horizon", timeout=timeout, interval=0.02)
