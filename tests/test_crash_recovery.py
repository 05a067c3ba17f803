"""Exactly-once effect: kill -9 mid-batch, restart, nothing lost and nothing applied twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from projectionist.demo.sample_events import append_sample_events
from projectionist.store.connection import connect
from projectionist.testing import poll_until
from tests.helpers import ROOT
from tests.projections import applied_count, verify_exactly_once

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _start_worker(db_url: str, worker_id: int, total: int, sleep: float) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "DATABASE_URL": db_url,
        "RECORDER_SLEEP": str(sleep),
        "WORKER_ID": str(worker_id),
        "TOTAL_WORKERS": str(total),
    }
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "projectionist",
            "worker",
            "--projection",
            "tests.projections:Recorder",
            "--batch-size",
            "20",
            "--log-level",
            "WARNING",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _applied(db_url: str) -> int:
    with connect(db_url, autocommit=True) as conn:
        return applied_count(conn)


def test_sigkill_mid_batch_then_restart_applies_each_event_once(db_url: str) -> None:
    with connect(db_url, autocommit=True) as conn:
        for _ in append_sample_events(conn, count=1500, aggregates=40, batch_size=100, seed=1):
            pass

    kills = 0
    # Each batch sleeps 50 ms inside its transaction, so a SIGKILL at a random
    # moment nearly always lands between the projection's writes and the commit.
    proc = _start_worker(db_url, 0, 1, sleep=0.05)
    try:
        deadline = time.monotonic() + 90
        while kills < 5 and time.monotonic() < deadline:
            time.sleep(0.4 + 0.1 * kills)
            before = _applied(db_url)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            assert proc.returncode == -signal.SIGKILL
            kills += 1
            assert _applied(db_url) >= before  # committed work survives the kill
            proc = _start_worker(db_url, 0, 1, sleep=0.05)
        poll_until(lambda: _applied(db_url) >= 1500, timeout=deadline - time.monotonic(), interval=0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert kills == 5
    assert proc.returncode == 0, out
    with connect(db_url, autocommit=True) as conn:
        result = verify_exactly_once(conn)
        checkpoint = conn.execute(
            "SELECT events_processed FROM projection_checkpoints WHERE projection_name = 'recorder'"
        ).fetchone()
    assert result == {"lost": 0, "duplicated": 0, "misordered": 0, "wrong_worker": 0}
    assert checkpoint == (1500,)
