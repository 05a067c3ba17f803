"""The command line: configuration errors, exit codes, signals, append, status, pool.

Every test but the signal handler's runs against the test server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from projectionist.cli.run import GracefulStop
from projectionist.consume.checkpoints import register_group
from projectionist.consume.processor import Processor
from projectionist.partitioning import Partition
from projectionist.store.connection import connect
from projectionist.testing import wait_for
from tests.helpers import ROOT, run_cli
from tests.projections import Recorder, verify_exactly_once


@pytest.mark.integration
@pytest.mark.parametrize(
    ("env", "args", "message"),
    [
        ({"WORKER_ID": "abc", "TOTAL_WORKERS": "4"}, [], "WORKER_ID='abc'"),
        ({"WORKER_ID": "-1", "TOTAL_WORKERS": "4"}, [], "WORKER_ID='-1'"),
        (
            {"WORKER_ID": "4", "TOTAL_WORKERS": "4"},
            [],
            "WORKER_ID=4 must be less than the partition count (PARTITIONS or TOTAL_WORKERS), 4",
        ),
        ({"WORKER_ID": "1", "TOTAL_WORKERS": "zero"}, [], "TOTAL_WORKERS='zero'"),
        ({"WORKER_ID": "1", "TOTAL_WORKERS": "0"}, [], "TOTAL_WORKERS='0'"),
        (
            {},
            ["--worker-id", "2", "--total-workers", "2"],
            "WORKER_ID=2 must be less than the partition count (PARTITIONS or TOTAL_WORKERS), 2",
        ),
        ({}, [], "WORKER_ID is not set"),
    ],
)
def test_invalid_worker_settings_exit_2_with_one_line(
    db_url: str, env: dict[str, str], args: list[str], message: str
) -> None:
    result = run_cli("worker", *args, db_url=db_url, env=env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message in lines[0]


@pytest.mark.integration
def test_a_flag_usage_error_keeps_the_usage_line(db_url: str) -> None:
    result = run_cli("worker", "--worker-id", "x", db_url=db_url)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("usage: projectionist worker ")
    *_, last = result.stderr.strip().splitlines()
    assert last == (
        "projectionist worker: error: argument --worker-id: --worker-id='x' is not a number or a "
        "StatefulSet pod name like 'projection-worker-3'"
    )


@pytest.mark.integration
def test_the_partition_count_names_must_agree(db_url: str) -> None:
    env = {"PARTITIONS": "4", "TOTAL_WORKERS": "2"}
    result = run_cli("worker", "--worker-id", "0", db_url=db_url, env=env)
    assert result.returncode == 2
    assert "PARTITIONS='4' and TOTAL_WORKERS='2' disagree; set one of them" in result.stderr


@pytest.mark.integration
def test_flags_override_environment(db_url: str) -> None:
    # The environment alone is invalid (5 >= 4); the flag makes it valid, so
    # the worker gets as far as the database (and is refused there for a
    # different reason: the projection's group already uses 6 partitions).
    with connect(db_url, autocommit=True) as conn:
        conn.execute("INSERT INTO projection_groups VALUES ('scalable_projection', 6)")
        conn.execute(
            "INSERT INTO projection_checkpoints (projection_name, total_workers, worker_id,"
            " last_global_position) VALUES ('scalable_projection', 6, 0, 10)"
        )
    result = run_cli(
        "worker", "--total-workers", "8", db_url=db_url, env={"WORKER_ID": "5", "TOTAL_WORKERS": "4"}
    )
    assert result.returncode == 2
    assert "partition count 8 (PARTITIONS or TOTAL_WORKERS) differs from the 6 partitions" in result.stderr


@pytest.mark.integration
def test_mismatched_total_workers_is_refused_once_the_group_has_progressed(db_url: str) -> None:
    run_cli("append", "--count", "50", "--aggregates", "5", db_url=db_url)
    first = _start(db_url, "worker", "--worker-id", "0", "--total-workers", "2")
    try:
        _wait_for(db_url, "SELECT events_processed > 0 FROM projection_checkpoints")
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=30)
    result = run_cli("worker", "--worker-id", "0", "--total-workers", "3", db_url=db_url)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "partition count 3 (PARTITIONS or TOTAL_WORKERS) differs from the 2 partitions" in result.stderr
    assert "`projectionist rescale --projection-name scalable_projection --partitions 3`" in result.stderr


@pytest.mark.integration
def test_statefulset_pod_name_is_the_worker_id(db_url: str) -> None:
    run_cli("append", "--count", "40", "--aggregates", "8", db_url=db_url)
    proc = _start(db_url, "worker", env={"WORKER_ID": "projection-worker-1", "TOTAL_WORKERS": "2"})
    try:
        _wait_for(
            db_url, "SELECT bool_or(worker_id = 1 AND events_processed > 0) FROM projection_checkpoints"
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)


@pytest.mark.integration
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_first_signal_stops_gracefully_with_exit_0(db_url: str, sig: signal.Signals) -> None:
    run_cli("append", "--count", "200", "--aggregates", "10", db_url=db_url)
    proc = _start(db_url, "worker", "--worker-id", "0")
    _wait_for(db_url, "SELECT events_processed = 200 FROM projection_checkpoints")
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "finishing the current batch" in out


@pytest.mark.timeout(10)  # the failure this guards against is a hang
def test_the_signal_handler_never_takes_the_stop_lock_itself() -> None:
    # A signal handler runs between two bytecodes of the main thread, maybe
    # inside Event.wait() with the Event's lock held: here, that lock. Setting
    # the Event from the handler itself would block forever.
    stopped = threading.Event()
    graceful = GracefulStop(stopped.set)
    with stopped._cond:  # type: ignore[attr-defined]
        graceful._handle(signal.SIGTERM, None)
        assert not stopped.is_set()
    assert stopped.wait(5)
    assert graceful.requested


@pytest.mark.integration
def test_append_then_pool_then_status(db_url: str) -> None:
    result = run_cli("append", "--count", "300", "--aggregates", "12", db_url=db_url)
    assert result.returncode == 0, result.stderr
    assert "appended 300 events to 12 aggregates" in result.stdout
    pool = _start(db_url, "pool", "--total-workers", "3", "--projection", "tests.projections:Recorder")
    try:
        _wait_for(db_url, "SELECT coalesce(sum(events_processed), 0) = 300 FROM projection_checkpoints")
    finally:
        pool.send_signal(signal.SIGTERM)
        out, _ = pool.communicate(timeout=30)
    assert pool.returncode == 0, out
    with connect(db_url, autocommit=True) as conn:
        assert verify_exactly_once(conn) == {"lost": 0, "duplicated": 0, "misordered": 0, "wrong_worker": 0}

    status = run_cli("status", "--json", db_url=db_url)
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    assert data["head_position"] == 300
    workers = data["projections"]["recorder"]["workers"]
    assert [w["worker_id"] for w in workers] == [0, 1, 2]
    assert sum(w["events_processed"] for w in workers) == 300
    assert all(w["lag_events"] == 0 and w["lag_seconds"] == 0 and not w["live"] for w in workers)

    # New events with no worker running show up as lag, in events and seconds.
    run_cli("append", "--count", "30", "--aggregates", "12", db_url=db_url)
    time.sleep(0.2)
    data = json.loads(run_cli("status", "--json", db_url=db_url).stdout)
    workers = data["projections"]["recorder"]["workers"]
    assert sum(w["lag_events"] for w in workers) == 30
    assert max(w["lag_seconds"] for w in workers) > 0
    table = run_cli("status", db_url=db_url)
    assert "recorder" in table.stdout and "lag (events)" in table.stdout


@pytest.mark.integration
def test_status_of_an_unknown_projection_is_an_error(db_url: str) -> None:
    with connect(db_url, autocommit=True) as conn:
        register_group(conn, "recorder", 1)
        Processor(Recorder(), Partition(0, 1)).start(conn)
    result = run_cli("status", "--projection-name", "recorderr", db_url=db_url)
    assert result.returncode == 2, result.stdout
    assert "recorderr" in result.stderr


def _start(db_url: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    full_env = {k: v for k, v in os.environ.items() if k not in ("WORKER_ID", "TOTAL_WORKERS")}
    full_env.update({"DATABASE_URL": db_url, **(env or {})})
    return subprocess.Popen(
        [sys.executable, "-m", "projectionist", *args],
        cwd=ROOT,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for(db_url: str, query: str, timeout: float = 30) -> None:
    """Until ``query``'s first column is true."""
    with connect(db_url, autocommit=True) as conn:

        def holds() -> bool:
            row = conn.execute(query).fetchone()
            return bool(row and row[0])

        wait_for(holds, query, timeout=timeout, interval=0.1)
