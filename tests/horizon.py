"""Waiting out the gap-safe read fence in tests that read once."""

from __future__ import annotations

import time

from projectionist.db import Connection


def wait_until_readable(conn: Connection, timeout: float = 30) -> None:
    """Wait until every committed event is below the read horizon.

    The reader holds back what an older transaction might still precede, and
    xids are cluster-wide: an autoanalyze or another test's session anywhere on
    the server can fence a read taken right after a commit. Workers simply poll
    again; a test that reads once has to wait the same way.
    """
    deadline = time.monotonic() + timeout
    while True:
        (ready,) = conn.execute(
            "SELECT coalesce(max(transaction_id) < pg_snapshot_xmin(pg_current_snapshot()), true) FROM events"
        ).fetchone()  # type: ignore[misc]
        if ready:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"committed events stayed behind the read horizon for {timeout} s")
        time.sleep(0.02)
