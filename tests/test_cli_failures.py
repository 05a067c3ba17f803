"""The CLI when the database is not there or not ready (one line, exit 1, no traceback), and the
embedded server's start-up: a stale pid file of a reused pid, several first users at once."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from projectionist.testing import wait_for
from tests.helpers import run_cli


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# A well-formed DATABASE_URL whose server is down: every command ends in a
# psycopg traceback instead of a one-line message with exit 1.
@pytest.mark.parametrize("args", [["status"], ["status", "--json"], ["migrate"], ["dead-letters", "list"]])
def test_unreachable_database_is_a_one_line_runtime_error(args: list[str]) -> None:
    url = f"postgresql://postgres@127.0.0.1:{_closed_port()}/postgres"
    result = run_cli(*args, db_url=url)
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def _env(data_dir: Path) -> dict[str, str]:
    return {"DATABASE_URL": "", "PROJECTIONIST_DATA_DIR": str(data_dir)}


# A stale postmaster.pid whose pid now belongs to another process (pid reuse
# after a crash or reboot, common in containers): `db start` prints a URL and
# exits 0 without starting anything, and every command then fails.
@pytest.mark.integration
def test_stale_pid_file_of_a_reused_pid_does_not_fake_a_running_server(tmp_path: Path) -> None:
    env = _env(tmp_path)
    try:
        first = run_cli("db", "start", env=env)
        assert first.returncode == 0, first.stderr
        stopped = run_cli("db", "stop", env=env)
        assert (stopped.returncode, stopped.stdout) == (0, "embedded PostgreSQL stopped\n")
        # Stopping again is fine, but must not claim it stopped something.
        again = run_cli("db", "stop", env=env)
        assert again.returncode == 0 and "was not running" in again.stdout, again.stdout
        pid_file = tmp_path / "pg" / "postmaster.pid"
        assert not pid_file.exists()
        other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        try:
            port = first.stdout.strip().rsplit(":", 1)[1].split("/")[0]
            pid_file.write_text(f"{other.pid}\n{tmp_path / 'pg'}\n1700000000\n{port}\n{tmp_path / 'pg'}\n")
            started = run_cli("db", "start", env=env)
            status = run_cli("migrate", env=env)
        finally:
            other.kill()
            other.wait()
        assert started.returncode == 0, started.stderr
        assert status.returncode == 0, status.stderr[-600:]
    finally:
        run_cli("db", "stop", env=env)


# Two commands started together on a fresh data directory (say two workers,
# `make`-style, without DATABASE_URL): both run initdb on the same directory
# and one fails with "exists but is not empty" (or connects to a port no
# server listens on).
@pytest.mark.integration
def test_two_first_users_of_the_embedded_server_both_succeed(tmp_path: Path) -> None:
    env = _env(tmp_path)
    full_env = {**os.environ, **env}
    try:
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "projectionist", "migrate"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=full_env,
            )
            for _ in range(3)
        ]
        results = [(p.wait(timeout=120), p.stderr.read()[-800:]) for p in procs]  # type: ignore[union-attr]
        for p in procs:
            p.stdout.close()  # type: ignore[union-attr]
            p.stderr.close()  # type: ignore[union-attr]
        assert all(code == 0 for code, _ in results), results
    finally:
        run_cli("db", "stop", env=env)


# `status` (and the other read-only commands) on a database nobody migrated yet,
# e.g. the first command after a fresh checkout: a psycopg UndefinedTable traceback.
@pytest.mark.integration
@pytest.mark.parametrize("args", [["status"], ["status", "--json"], ["dead-letters", "list"]])
def test_commands_on_an_unmigrated_database_fail_with_one_line(pg_server: object, args: list[str]) -> None:

    with pg_server.fresh_database() as url:
        result = run_cli(*args, db_url=url)
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr[-400:]
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "migrate" in result.stderr


# Killed while initdb ran (the container stopped on first start, say): the
# half-built data directory must not make every later start fail.
@pytest.mark.integration
def test_a_start_killed_during_initdb_leaves_nothing_that_blocks_the_next(tmp_path: Path) -> None:
    env = _env(tmp_path)
    full_env = {**os.environ, **env}
    proc = subprocess.Popen(
        [sys.executable, "-m", "projectionist", "db", "start"],
        env=full_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )

    def initdb_halfway() -> bool:
        assert proc.poll() is None, "db start ended before initdb was halfway"
        return any(tmp_path.rglob("PG_VERSION"))

    try:
        wait_for(initdb_halfway, "initdb to start", timeout=60, interval=0.005)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        started = run_cli("db", "start", env=env, timeout=120)
        assert started.returncode == 0, started.stderr[-800:]
        migrated = run_cli("migrate", env=env)
        assert migrated.returncode == 0, migrated.stderr[-800:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        run_cli("db", "stop", env=env)


def test_a_data_directory_holding_something_else_is_refused_untouched(tmp_path: Path) -> None:
    data = tmp_path / "pg"
    data.mkdir()
    (data / "notes.txt").write_text("mine")
    result = run_cli("db", "start", env=_env(tmp_path))
    assert result.returncode == 1, result.stderr
    assert "is not empty and holds no database" in result.stderr
    assert (data / "notes.txt").read_text() == "mine"


# A database the upstream Go example set up holds tables named events and
# projection_checkpoints: migrate must explain, not die with a traceback.
@pytest.mark.integration
def test_migrate_on_the_upstream_examples_tables_explains_and_changes_nothing(pg_server: object) -> None:
    from projectionist.store.connection import connect

    with pg_server.fresh_database() as url:
        with connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE events (global_position bigserial PRIMARY KEY, data jsonb)")
            conn.execute(
                "CREATE TABLE projection_checkpoints (projection_name text, last_global_position bigint)"
            )
            conn.execute("""INSERT INTO events (data) VALUES ('{"seed": 1}')""")
        result = run_cli("migrate", db_url=url)
        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr
        assert 'migration 0001_event_store cannot run: relation "events" already exists' in result.stderr
        assert "ALTER TABLE events RENAME TO upstream_events" in result.stderr
        with connect(url, autocommit=True) as conn:
            assert conn.execute("SELECT data FROM events").fetchall() == [({"seed": 1},)]
            assert conn.execute("SELECT to_regclass('schema_migrations')").fetchone() == (None,)
            conn.execute("ALTER TABLE events RENAME TO upstream_events")
            conn.execute("ALTER TABLE projection_checkpoints RENAME TO upstream_projection_checkpoints")
        assert run_cli("migrate", db_url=url).returncode == 0


# A bind mount of the same file system (a Kubernetes subPath) passes for an
# ordinary directory, but refuses the rename with EBUSY: the cluster must not
# stay in the side directory, where every start would fail the same way.
@pytest.mark.integration
def test_a_data_directory_that_refuses_the_rename_is_initialised_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from projectionist.store.embedded import EmbeddedPostgres

    data = tmp_path / "pg"
    data.mkdir()
    rename = Path.rename

    def refused(self: Path, target: str | Path) -> Path:
        if Path(target) == data:
            raise OSError(errno.EBUSY, "Device or resource busy")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", refused)
    server = EmbeddedPostgres(data)
    try:
        server.start()
        assert (data / "PG_VERSION").exists()
        assert not (tmp_path / ".pg.initdb").exists()
        with psycopg.connect(server.url, connect_timeout=5) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        server.destroy()


# Migration 0005's lock is brief, but queued behind a long query it would
# hold up every append and read behind it; it gives up after 10 s instead.
@pytest.mark.integration
@pytest.mark.slow
def test_migration_0005_gives_up_behind_a_long_query_and_applies_nothing(db_url: str) -> None:
    from projectionist.store.connection import connect

    with connect(db_url, autocommit=True) as conn:
        conn.execute("ALTER TABLE events DROP CONSTRAINT events_created_at_in_python_range")
        conn.execute("DELETE FROM schema_migrations WHERE version = 5")
    with connect(db_url) as reader:
        reader.execute("SELECT count(*) FROM events")  # holds its lock until the transaction ends
        result = run_cli("migrate", db_url=db_url)  # without a timeout: waits as long as the reader
    assert result.returncode == 1, result.stderr
    assert "migration 0005_created_at_range gave up waiting for its lock" in result.stderr
    assert "Traceback" not in result.stderr
    assert run_cli("migrate", db_url=db_url).returncode == 0  # once the reader has gone


# Workers are meant to run with DML rights only. The sample projection's
# setup must not need CREATE on the schema once its table exists, and a
# missing right is one line, not a traceback.
@pytest.mark.integration
def test_a_role_with_the_documented_rights_runs_a_worker_and_a_missing_one_is_one_line(
    pg_server: object,
) -> None:
    role = f"w_{os.getpid()}_{time.monotonic_ns() % 10**6}"
    try:
        _run_as_a_dml_role(pg_server, role)
    finally:
        with pg_server.admin() as admin:  # type: ignore[attr-defined]
            admin.execute(f"DROP ROLE IF EXISTS {role}")


def _run_as_a_dml_role(pg_server: object, role: str) -> None:
    from psycopg.conninfo import make_conninfo

    from projectionist.consume.processor import Processor
    from projectionist.demo.sample_projection import ScalableProjection
    from projectionist.partitioning import Partition
    from projectionist.records import NewEvent
    from projectionist.store.appending import append
    from projectionist.store.connection import connect
    from projectionist.store.schema import migrate

    with pg_server.fresh_database() as url:
        with connect(url, autocommit=True) as owner:
            migrate(owner)
            ScalableProjection().setup(owner)  # created beforehand, as the README says
            append(owner, "a", [NewEvent("E", {})])
            owner.execute(f"CREATE ROLE {role} LOGIN")
            owner.execute(f"REVOKE CREATE ON SCHEMA public FROM PUBLIC; GRANT SELECT ON events TO {role}")
            owner.execute(
                f"GRANT SELECT ON schema_migrations TO {role}; "
                "GRANT SELECT, INSERT, UPDATE, DELETE ON projection_checkpoints, projection_groups, "
                f"projection_skip_marks, dead_letters, scalable_projection_aggregates TO {role}"
            )
        worker_url = make_conninfo(url, user=role)
        with connect(worker_url, autocommit=True) as conn:
            processor = Processor(ScalableProjection(), Partition(0, 1))
            processor.start(conn)
            assert processor.run_batch(conn).applied == 1
        # Without SELECT on the sequence, status cannot read the head.
        result = run_cli("status", db_url=worker_url)
        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert "the database role lacks a right (permission denied for sequence" in result.stderr
