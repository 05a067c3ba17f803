"""``projectionist demo`` end to end: real workers on a real server, and a verdict that can fail."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from projectionist.demo.run import demo_lock_key
from projectionist.demo.verify import verify
from projectionist.store.connection import Connection, connect
from projectionist.testing import PostgresServer, poll_until, wait_for
from tests.helpers import ROOT, run_cli

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Small enough for CI, large enough that every step shows: lagging partitions,
# catch-up, and a share per worker that FNV-1a keeps near 25%.
SMALL = ("--events", "3000", "--rate", "300")
DEMO_ARGS = ("demo", *SMALL, "--step-seconds", "1.5")
CHECKS = (
    "every event applied exactly once",
    "per-aggregate order preserved",
    "each aggregate handled by exactly one worker",
    "checkpoints agree with the read model",
    "shares near 25%",
    "all workers caught up (lag 0)",
    "workers exited 0 on SIGTERM",
)


@pytest.fixture(scope="module")
def demo_run(pg_server: PostgresServer) -> Iterator[tuple[subprocess.CompletedProcess[str], str]]:
    """One real demo run, in a database of its own on the test server."""
    name = f"demo_{uuid.uuid4().hex[:10]}"
    result = run_cli(*DEMO_ARGS, "--database", name, db_url=pg_server.admin_url, timeout=120)
    try:
        yield result, name
    finally:
        pg_server.drop_database(name)


@pytest.fixture
def demo_copy(
    pg_server: PostgresServer, demo_run: tuple[subprocess.CompletedProcess[str], str]
) -> Iterator[str]:
    """A private copy of the demo's database, free to corrupt."""
    name = f"democopy_{uuid.uuid4().hex[:10]}"
    pg_server.create_database(name, template=demo_run[1])
    try:
        yield name
    finally:
        pg_server.drop_database(name)


def test_demo_scales_one_to_four_workers_and_passes(
    demo_run: tuple[subprocess.CompletedProcess[str], str], pg_server: PostgresServer
) -> None:
    result, name = demo_run
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    for check in CHECKS:
        assert f"PASS  {check}" in out, out
    assert "FAIL" not in out
    assert "PASS: all 7 checks passed" in out
    # The plain (non-TTY) table showed the steps: partitions without a worker
    # lagging, then all four live.
    assert "not started" in out
    assert out.count("live") >= 4
    with connect(pg_server.url_for(name), autocommit=True) as conn:
        assert verify(conn, 4).ok
        workers = conn.execute(
            "SELECT count(*) FROM projection_checkpoints WHERE projection_name = 'scalable_projection' "
            "AND total_workers = 4 AND events_processed > 0"
        ).fetchone()
    assert workers == (4,)


def test_verify_only_exits_1_once_the_read_model_is_corrupted(
    pg_server: PostgresServer, demo_copy: str
) -> None:
    clean = run_cli("demo", "--verify-only", "--database", demo_copy, db_url=pg_server.admin_url)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "PASS: all 5 checks passed" in clean.stdout

    with connect(pg_server.url_for(demo_copy), autocommit=True) as conn:
        conn.execute(
            "UPDATE scalable_projection_aggregates SET event_count = event_count + 1 "
            "WHERE aggregate_id = 'aggregate-7'"
        )
    broken = run_cli("demo", "--verify-only", "--database", demo_copy, db_url=pg_server.admin_url)
    assert broken.returncode == 1, broken.stdout + broken.stderr
    assert "FAIL  every event applied exactly once" in broken.stdout
    assert "aggregate-7" in broken.stdout
    assert "FAIL: " in broken.stdout


# Each corruption breaks one property the demo promises; the named check must catch it.
_AGG = "UPDATE scalable_projection_aggregates SET {} WHERE aggregate_id = 'aggregate-7'"
CORRUPTIONS = {
    "applied twice": (_AGG.format("event_count = event_count + 1"), "every event applied exactly once"),
    "never applied": (
        "DELETE FROM scalable_projection_aggregates WHERE aggregate_id = 'aggregate-7'",
        "every event applied exactly once",
    ),
    "out of order": (_AGG.format("out_of_order = 1"), "per-aggregate order preserved"),
    "stale last version": (_AGG.format("last_version = last_version - 1"), "per-aggregate order preserved"),
    "two workers": (
        _AGG.format("workers = workers || ((worker_id + 1) % 4)"),
        "each aggregate handled by exactly one worker",
    ),
    "wrong partition": (
        _AGG.format("worker_id = (worker_id + 1) % 4, workers = ARRAY[(worker_id + 1) % 4]"),
        "each aggregate handled by exactly one worker",
    ),
    "checkpoint off by one": (
        "UPDATE projection_checkpoints SET events_processed = events_processed + 1 WHERE worker_id = 2",
        "checkpoints agree with the read model",
    ),
    "one worker did everything": (
        "UPDATE scalable_projection_aggregates SET worker_id = 0, workers = ARRAY[0]",
        "shares near 25%",
    ),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_verification_catches(corruption: str, pg_server: PostgresServer, demo_copy: str) -> None:
    statement, check = CORRUPTIONS[corruption]
    with connect(pg_server.url_for(demo_copy), autocommit=True) as conn:
        assert verify(conn, 4).ok
        conn.execute(statement.encode())
        result = verify(conn, 4)
    assert not result.ok
    failed = {c.name for c in result.checks if not c.ok}
    assert check in failed, result.checks


def _workers_of(demo_pid: int) -> list[int]:
    """Worker processes the demo ``demo_pid`` started (their launcher gets its pid as argv[1])."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        launched = len(argv) > 7 and argv[1] == b"-c" and argv[3] == str(demo_pid).encode()
        if launched and argv[5:8] == [b"-m", b"projectionist", b"worker"]:
            found.append(int(entry.name))
    return found


def _start_demo_until_workers_run(pg_server: PostgresServer, name: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORKER_ID", "TOTAL_WORKERS")}
    env.update(DATABASE_URL=pg_server.admin_url, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        # Long steps: only worker 0 starts before the signal.
        [sys.executable, "-m", "projectionist", "demo", *SMALL, "--step-seconds", "30", "--database", name],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=ROOT,
        # Like a terminal: Ctrl-C delivers SIGINT (a test runner may have it ignored).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    for line in proc.stdout:
        if "live" in line and _workers_of(proc.pid):
            return proc
        assert time.monotonic() < deadline, "the demo did not get a worker live"
    raise AssertionError(f"the demo ended early with code {proc.wait()}")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill-9"])
def test_no_worker_outlives_the_demo(pg_server: PostgresServer, sig: signal.Signals) -> None:
    name = f"demo_{uuid.uuid4().hex[:10]}"
    proc = _start_demo_until_workers_run(pg_server, name)
    try:
        assert len(_workers_of(proc.pid)) == 1
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=30)
        if sig == signal.SIGINT:
            assert proc.returncode == 130, out
            assert "interrupted: every worker was stopped" in out
        else:
            assert proc.returncode == -signal.SIGKILL
        # Ctrl-C: the demo stopped them itself. kill -9: PR_SET_PDEATHSIG did.
        poll_until(lambda: not _workers_of(proc.pid), timeout=10, interval=0.1)
        assert _workers_of(proc.pid) == []
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in _workers_of(proc.pid):
            os.kill(pid, signal.SIGKILL)
        pg_server.drop_database(name)


# A second demo on the same database must not drop it WITH (FORCE) under the
# first one, whose workers would then all fail.
def test_a_second_demo_on_the_same_database_is_refused_and_drops_nothing(pg_server: PostgresServer) -> None:
    name = f"demo_{uuid.uuid4().hex[:10]}"
    pg_server.create_database(name)
    try:
        with connect(pg_server.url_for(name), autocommit=True) as first:
            first.execute("CREATE TABLE still_here ()")
        with (
            connect(pg_server.url_for("postgres"), autocommit=True) as running,  # what a running demo holds
            pg_server.fresh_database() as elsewhere,
        ):
            running.execute("SELECT pg_advisory_lock(%s)", (demo_lock_key(name),))
            result = run_cli(*DEMO_ARGS, "--database", name, db_url=pg_server.admin_url, timeout=60)
            # Advisory locks belong to one database: a DATABASE_URL naming
            # another must still meet the first demo's lock.
            verify_only = run_cli("demo", "--verify-only", "--database", name, db_url=elsewhere)
        assert result.returncode == 1, result.stdout + result.stderr
        assert f"another demo is using the database {name!r}" in result.stderr
        assert verify_only.returncode == 1 and "another demo" in verify_only.stderr
        with connect(pg_server.url_for(name), autocommit=True) as conn:
            assert conn.execute("SELECT to_regclass('still_here') IS NOT NULL").fetchone() == (True,)
        other = run_cli("demo", "--verify-only", "--database", f"{name}_x", db_url=pg_server.admin_url)
        assert "another demo" not in other.stderr  # the lock is per database
    finally:
        pg_server.drop_database(name)


def _connect_or_none(url: str) -> Connection | None:
    try:
        return connect(url, autocommit=True)
    except psycopg.OperationalError:
        return None


# The demo stops the embedded server it started, even when something else
# began to use it meanwhile (a worker, psql, a second demo): cut off.
def test_the_demo_leaves_its_embedded_server_running_for_other_clients(tmp_path: Path) -> None:
    env = {"DATABASE_URL": "", "PROJECTIONIST_DATA_DIR": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    full_env = {k: v for k, v in os.environ.items() if k not in ("WORKER_ID", "TOTAL_WORKERS")}
    full_env.update(env)
    proc = subprocess.Popen(
        [sys.executable, "-m", "projectionist", "demo", *SMALL, "--step-seconds", "0.5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=full_env,
        cwd=ROOT,
    )
    found: list[subprocess.CompletedProcess[str]] = []
    users: list[Connection | None] = []

    def server_up() -> bool:
        found.append(run_cli("db", "url", env=env))
        assert found[-1].returncode == 0 or proc.poll() is None, found[-1].stderr
        return found[-1].returncode == 0

    def demo_database_up(demo_db: str) -> bool:
        users.append(_connect_or_none(demo_db))
        assert users[-1] is not None or proc.poll() is None, "no demo database"
        return users[-1] is not None

    try:
        wait_for(server_up, "the demo's embedded server", timeout=60, interval=0.2)
        # Someone looking at the demo's read model, in the demo's own database.
        demo_db = make_conninfo(found[-1].stdout.strip(), dbname="projectionist_demo")
        wait_for(lambda: demo_database_up(demo_db), "the demo's database", timeout=60, interval=0.2)
        user = users[-1]
        assert user is not None
        with user:
            out, _ = proc.communicate(timeout=120)
            assert proc.returncode == 0, out
            assert "left the embedded server running: 1 other connection(s) use it" in out
            assert user.execute("SELECT 1").fetchone() == (1,)
        # Alone on it, the demo stops the server it started: its own workers'
        # connections are not "other clients".
        assert run_cli("db", "stop", env=env).returncode == 0
        alone = run_cli(*DEMO_ARGS, env=env, timeout=120)
        assert alone.returncode == 0, alone.stdout + alone.stderr
        assert "left the embedded server running" not in alone.stdout
        assert run_cli("db", "url", env=env).returncode == 1
    finally:
        if proc.poll() is None:
            proc.kill()
        run_cli("db", "stop", env=env)
