"""`projectionist rebuild`: reset through the projection's hook, then catch up again; with letters
queued for retry, under the configured poison policy, with a live idle worker, and when its own
workers die."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from projectionist.consume import dead_letters
from projectionist.consume.checkpoints import register_group
from projectionist.consume.processor import Processor
from projectionist.errors import ProjectionError
from projectionist.hooks import WorkerState
from projectionist.partitioning import Partition
from projectionist.records import NewEvent
from projectionist.settings import PoisonPolicy, WorkerOptions
from projectionist.store.appending import append
from projectionist.store.connection import connect
from projectionist.testing import wait_for, wait_until_readable
from projectionist.worker.worker import Worker
from tests.helpers import ROOT, run_cli, running
from tests.projections import PoisonSensitive, Recorder, applied_count, load_sample, verify_exactly_once

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
        wait_for(
            lambda: sum(r[1] for r in _read_model(db_url)) >= 600,
            "the workers to apply 600 events",
            timeout=30,
            interval=0.2,
        )
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


# Letters queued for retry describe the old read model: left in place, the
# replay would apply them before reaching their aggregate's earlier events, then again.
def test_rebuild_with_a_queued_retry_applies_each_event_once_in_order(db_url: str) -> None:
    with connect(db_url, autocommit=True) as conn:
        append(conn, "a", [NewEvent("E", {})])
        append(conn, "a", [NewEvent("E", {"poison": True})])
        append(conn, "a", [NewEvent("E", {})])
        register_group(conn, "poison_sensitive", 1)
        wait_until_readable(conn)
        processor = Processor(PoisonSensitive(), Partition(0, 1), policy=PoisonPolicy.PARK)
        processor.start(conn)
        with pytest.raises(ProjectionError):
            processor.run_batch(conn)
        processor.run_batch(conn, isolate=True)  # parks a2 (failed) and a3 (blocked)
        letters = dead_letters.list_letters(conn)
        assert [(x.aggregate_version, x.reason) for x in letters] == [(2, "failed"), (3, "blocked")]
        conn.execute("CREATE TABLE poison_healed ()")  # the operator fixes the bug
        assert dead_letters.request_retry(conn, letters[0].id) == 2  # workers are stopped
        result = run_cli(
            "rebuild",
            "--projection",
            "tests.projections:PoisonSensitive",
            "--timeout",
            "30",
            db_url=db_url,
            timeout=90,
        )
        assert result.returncode == 0, result.stderr
        assert verify_exactly_once(conn, "poison_sensitive") == {
            "lost": 0,
            "duplicated": 0,
            "misordered": 0,
            "wrong_worker": 0,
        }


# rebuild's own workers run with the configured POISON_POLICY and MAX_RETRIES.
def test_rebuild_honours_the_configured_poison_policy(db_url: str) -> None:
    with connect(db_url, autocommit=True) as conn:
        append(conn, "a", [NewEvent("E", {})])
        append(conn, "b", [NewEvent("E", {"poison": True})])
        append(conn, "c", [NewEvent("E", {})])
    result = run_cli(
        "rebuild",
        "--projection",
        "tests.projections:PoisonSensitive",
        "--timeout",
        "20",
        db_url=db_url,
        env={"POISON_POLICY": "park", "MAX_RETRIES": "1"},
        timeout=90,
    )
    assert result.returncode == 0, result.stderr
    with connect(db_url, autocommit=True) as conn:
        assert [(x.aggregate_id, x.reason) for x in dead_letters.list_letters(conn)] == [("b", "failed")]


# A rebuild whose own workers die reports why at once, instead of watching a
# lag that can no longer fall until its --timeout runs out.
def test_rebuild_stops_when_its_workers_die(db_url: str) -> None:
    with connect(db_url, autocommit=True) as conn:
        append(conn, "a", [NewEvent("E", {})])
    result = run_cli(
        "rebuild",
        "--projection",
        "tests.projections:SetupFailsInWorkers",
        "--timeout",
        "600",
        db_url=db_url,
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    assert (
        "rebuilding 'setup_fails_in_workers' failed: worker 0/1 stopped: "
        "ConfigError: this projection's setup fails in every worker"
    ) in result.stderr
    assert "Traceback" not in result.stderr


def test_rebuild_force_with_an_idle_live_worker_rebuilds_the_read_model(db_url: str) -> None:
    # rebuild --force counts on live workers being fenced, but an idle one commits
    # nothing: it must still notice that its checkpoint moved, or it keeps reading
    # from its old position and the emptied read model stays empty.
    worker = Worker(db_url, Recorder(), Partition(0, 1), WorkerOptions(poll_interval=0.1))
    with connect(db_url, autocommit=True) as conn, running(worker):
        load_sample(conn, 300, 10)
        wait_for(
            lambda: applied_count(conn) == 300 and worker.state is WorkerState.LIVE, "the worker to go live"
        )
        result = run_cli(
            "rebuild",
            "--projection",
            "tests.projections:Recorder",
            "--force",
            "--timeout",
            "8",
            db_url=db_url,
        )
        assert result.returncode == 0, result.stderr.strip().splitlines()[-1]
        assert applied_count(conn) == 300
