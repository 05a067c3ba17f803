"""`projectionist rebuild`: reset through the projection's hook, then catch up again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from projectionist.store.connection import connect
from tests.helpers import ROOT, run_cli

pytestmark = pytest.mark.integration


def _read_model(db_url: str) -> list[tuple[str, int, int]]:
    with connect(db_url, autocommit=True) as conn:
        exists = conn.execute("SELECT to_regclass('scalable_projection_aggregates') IS NOT NULL").fetchone()
        if not exists or not exists[0]:
            return []
        return [
            (r[0], r[1], r[2])
            for r in conn.execute(
                "SELECT aggregate_id, event_count, last_version"
                " FROM scalable_projection_aggregates ORDER BY 1"
            )
        ]


def test_rebuild_resets_and_catches_up_to_the_same_read_model(db_url: str) -> None:
    assert run_cli("append", "--count", "600", "--aggregates", "20", db_url=db_url).returncode == 0
    env = {**os.environ, "DATABASE_URL": db_url}
    worker = subprocess.Popen(
        [sys.executable, "-m", "projectionist", "worker", "--worker-id", "0", "--total-workers", "2"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    other = subprocess.Popen(
        [sys.executable, "-m", "projectionist", "worker", "--worker-id", "1", "--total-workers", "2"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while sum(r[1] for r in _read_model(db_url)) < 600:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        before = _read_model(db_url)
        refused = run_cli("rebuild", db_url=db_url)  # the default projection, the sample
        assert refused.returncode == 2
        assert "are running; stop them or pass --force" in refused.stderr
    finally:
        for p in (worker, other):
            p.send_signal(signal.SIGTERM)
            p.communicate(timeout=30)

    with connect(db_url, autocommit=True) as conn:
        # Corrupt the read model: a rebuild must repair it from the events.
        conn.execute("UPDATE scalable_projection_aggregates SET event_count = event_count + 5")
    result = run_cli(
        "rebuild", "--projection", "projectionist.demo:ScalableProjection", db_url=db_url, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "rebuilt 'scalable_projection': 600 events applied" in result.stderr
    assert _read_model(db_url) == before
    status = run_cli("status", "--json", db_url=db_url)
    assert '"lag_events": 0' in status.stdout


def test_rebuild_of_an_unknown_projection_name_is_a_config_error(db_url: str) -> None:
    result = run_cli("rebuild", "--projection", "nope", db_url=db_url)
    assert result.returncode == 2
    assert "PROJECTION='nope' must look like 'package.module:ClassName'" in result.stderr
