"""Migrations: `projectionist migrate` applies each numbered file once, under its advisory lock,
however many migrators run at once and whatever the database's default isolation level."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import psycopg
import pytest

from projectionist.store.connection import connect
from projectionist.store.schema import _MIGRATION_LOCK_KEY, available_migrations, migrate
from projectionist.testing import PostgresServer
from tests.helpers import ROOT, run_cli

pytestmark = pytest.mark.integration


def test_migrate_is_idempotent_and_safe_in_parallel(pg_server: PostgresServer) -> None:
    with pg_server.fresh_database() as url:
        env = {**os.environ, "DATABASE_URL": url}
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "projectionist", "migrate"],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(4)
        ]
        outputs = [p.communicate(timeout=60) for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0, 0], outputs
        assert sum("applied 0001_event_store" in out for out, _ in outputs) == 1
        again = run_cli("migrate", db_url=url)
        assert again.returncode == 0 and "up to date" in again.stdout
        with connect(url) as conn:
            versions = conn.execute("SELECT version FROM schema_migrations").fetchall()
        assert versions == [(m.version,) for m in available_migrations()]


# Under a REPEATABLE READ default the lock statement would take the snapshot before
# the other migrator committed: the second one would apply 0001 again and fail.
def test_concurrent_migrate_under_repeatable_read_default(pg_server: PostgresServer) -> None:
    with pg_server.fresh_database() as url:
        dbname = psycopg.conninfo.conninfo_to_dict(url)["dbname"]
        with pg_server.admin() as admin:
            admin.execute(f"ALTER DATABASE {dbname} SET default_transaction_isolation = 'repeatable read'")
        errors: list[BaseException] = []
        applied: list[int] = []
        with connect(url, autocommit=True) as holder:
            # Hold the migration lock, so both migrators start their transaction before it ends.
            holder.execute("BEGIN")
            holder.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK_KEY,))

            def run() -> None:
                try:
                    with connect(url, autocommit=True) as own:
                        applied.append(len(migrate(own)))
                except BaseException as e:
                    errors.append(e)

            threads = [threading.Thread(target=run) for _ in range(2)]
            for t in threads:
                t.start()
            time.sleep(1.0)
            holder.execute("COMMIT")
            for t in threads:
                t.join(60)
        assert errors == [], errors
        assert sorted(applied)[0] == 0


@pytest.mark.parametrize("command", [["worker", "--worker-id", "0"], ["pool"], ["catch-up"]])
def test_workers_refuse_an_unmigrated_database(pg_server: PostgresServer, command: list[str]) -> None:
    # Migrating is a step of its own: a worker neither migrates nor waits, it says what to run.
    with pg_server.fresh_database() as url:
        result = run_cli(*command, db_url=url)
        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr
        pending = available_migrations()
        assert pending[0].name == "event_store"
        names = ", ".join(f"{m.version:04d}_{m.name}" for m in pending)
        assert result.stderr.strip().splitlines()[-1] == (
            f"projectionist: the database is not migrated ({len(pending)} pending: {names}); "
            "run `projectionist migrate` first"
        )
        with connect(url, autocommit=True) as conn:
            assert conn.execute("SELECT to_regclass('events')").fetchone() == (None,)


def test_migrate_opts_back_in_at_start_up(pg_server: PostgresServer) -> None:
    with pg_server.fresh_database() as url:
        result = run_cli("catch-up", "--migrate", db_url=url, env={"LOG_LEVEL": "WARNING"})
        assert result.returncode == 0, result.stderr
        with connect(url, autocommit=True) as conn:
            versions = [row[0] for row in conn.execute("SELECT version FROM schema_migrations ORDER BY 1")]
        assert versions == [m.version for m in available_migrations()]
