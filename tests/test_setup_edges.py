"""Set-up edges: every bad setting is a one-line error (exit 2); `partition-index drop` re-checks
running workers once it holds the builder lock; concurrent migrations under a REPEATABLE READ default."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

from projectionist.consume import partition_indexes
from projectionist.consume.checkpoints import register_group
from projectionist.consume.ownership import TRY_LOCK, group_key
from projectionist.errors import ConfigError
from projectionist.settings import Settings
from projectionist.store.connection import Connection, connect
from projectionist.store.schema import _MIGRATION_LOCK_KEY, migrate
from projectionist.testing import PostgresServer
from tests.helpers import run_cli

pytestmark = pytest.mark.integration


def _one_config_error_line(result: object, name: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)  # type: ignore[attr-defined]
    lines = result.stderr.strip().splitlines()  # type: ignore[attr-defined]
    assert len(lines) == 1, result.stderr  # type: ignore[attr-defined]
    assert name in lines[0]


# logging.basicConfig would raise a traceback (exit 1) for an unknown level.
@pytest.mark.parametrize(
    ("env", "args"),
    [({"LOG_LEVEL": "verbose"}, ["status"]), ({}, ["--log-level", "loud", "status"])],
)
def test_invalid_log_level_is_a_one_line_config_error(env: dict[str, str], args: list[str]) -> None:
    result = run_cli(*args, db_url="postgresql://unused", env=env)
    _one_config_error_line(result, "LOG_LEVEL")


# The flag must get the check the variable gets: at 0 the worker polls in a busy loop.
@pytest.mark.parametrize("value", [0.0, -1.0, float("nan")])
def test_poll_interval_flag_is_validated_like_the_environment(value: float) -> None:
    with pytest.raises(ConfigError, match="POLL_INTERVAL"):
        Settings.from_env({}, poll_interval=value)


# A malformed DATABASE_URL used to end every command in a psycopg traceback (exit 1).
# The message must not quote it: libpq's own message quotes a bad password.
@pytest.mark.parametrize(("url", "secret"), [("notaurl", "notaurl"), ("postgresql://u:p%zz@h/db", "p%zz")])
def test_malformed_database_url_is_a_one_line_config_error(url: str, secret: str) -> None:
    result = run_cli("status", env={"DATABASE_URL": url})
    _one_config_error_line(result, "DATABASE_URL")
    assert secret not in result.stderr


# The columns and lock keys are int4: a larger count used to end in NumericValueOutOfRange.
def test_total_workers_beyond_the_database_range_is_a_config_error(db_url: str) -> None:
    result = run_cli(
        "worker", db_url=db_url, env={"WORKER_ID": "0", "TOTAL_WORKERS": "3000000000"}, timeout=60
    )
    _one_config_error_line(result, "TOTAL_WORKERS")


# drop may wait minutes for another build; workers that start meanwhile must
# still keep their indexes (without --force).
def test_drop_rechecks_running_workers_after_waiting_for_the_builder_lock(
    conn: Connection, db_url: str
) -> None:
    conn.execute(
        "INSERT INTO events (event_id, aggregate_id, aggregate_version, partition_hash, event_type, payload)"
        " SELECT gen_random_uuid(), 'a' || g, 1, g, 'E', '{}' FROM generate_series(1, 200) g"
    )
    partition_indexes.create_indexes(conn, 2)
    register_group(conn, "orders", 2)
    outcome: list[object] = []
    with connect(db_url, autocommit=True) as other_builder, connect(db_url, autocommit=True) as worker:
        # Another session's build or drop is running.
        assert other_builder.execute(partition_indexes._TRY_BUILDER_LOCK).fetchone() == (True,)

        def drop() -> None:
            try:
                with connect(db_url, autocommit=True) as own:
                    outcome.append(partition_indexes.drop_indexes(own, 2))
            except BaseException as e:
                outcome.append(e)

        dropper = threading.Thread(target=drop)
        dropper.start()
        time.sleep(1.0)  # drop has checked for live workers and now waits for the lock
        # A worker of the 2-partition group starts meanwhile.
        assert worker.execute(TRY_LOCK, (group_key("orders", 2), 0)).fetchone() == (True,)
        other_builder.execute(partition_indexes._BUILDER_UNLOCK)
        dropper.join(30)
        assert len(outcome) == 1
        assert isinstance(outcome[0], ConfigError), f"dropped under a running worker: {outcome[0]}"
        assert partition_indexes.is_ready(conn, 2, 0)


# Under a REPEATABLE READ default the lock statement would take the snapshot, before
# the other migrator committed: the second one applied 0001 again and failed.
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
