"""``projectionist demo --elastic``: the 1 -> 4 story with no worker ids, one leaving at the end, verified."""

from __future__ import annotations

import uuid

import pytest

from projectionist.testing import PostgresServer
from tests.helpers import run_cli

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHECKS = (
    "every event applied exactly once",
    "per-aggregate order preserved",
    "each aggregate handled by exactly one worker",
    "checkpoints agree with the read model",
    "shares near 12%",
    "all partitions caught up (lag 0)",
    "workers exited 0 on SIGTERM (the one that left too)",
    "partitions moved as workers joined and left, no worker id given",
)


def test_the_elastic_demo_moves_partitions_as_workers_join_and_leave_and_passes(
    pg_server: PostgresServer,
) -> None:
    name = f"demo_{uuid.uuid4().hex[:10]}"
    try:
        result = run_cli(
            *("demo", "--elastic", "--events", "3000", "--rate", "300", "--step-seconds", "1.5"),
            *("--database", name),
            db_url=pg_server.admin_url,
            timeout=120,
        )
        out = result.stdout
        assert result.returncode == 0, out + result.stderr
        for check in CHECKS:
            assert f"PASS  {check}" in out, out
        assert "PASS: all 8 checks passed" in out
        # The live table: partitions changing hands as workers join, and when one leaves.
        assert "(moved)" in out and "worker 2 left" in out
        assert "members: worker 1: " in out and "worker 4: " in out
        # The verdict can be read again later, from the database alone.
        again = run_cli("demo", "--verify-only", "--database", name, db_url=pg_server.admin_url)
        assert again.returncode == 0 and "8 partitions" not in again.stdout and "PASS: all 5" in again.stdout
    finally:
        pg_server.drop_database(name)
