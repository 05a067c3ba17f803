"""Numbered SQL migrations, applied once each under an advisory lock."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from importlib import resources

from psycopg import errors, sql
from psycopg.pq import TransactionStatus

from projectionist.errors import MigrationError, NotMigratedError, first_line
from projectionist.store.connection import Connection

log = logging.getLogger(__name__)

# Any constant works; it only has to be the same for every process that migrates.
_MIGRATION_LOCK_KEY = 0x70726F6A  # "proj"
_FILE_NAME = re.compile(r"^(?P<version>\d{4})_(?P<name>[a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def available_migrations() -> list[Migration]:
    found = []
    for entry in resources.files("projectionist.store.migrations").iterdir():
        match = _FILE_NAME.match(entry.name)
        if match:
            found.append(Migration(int(match["version"]), match["name"], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"duplicate migration versions: {versions}")
    return found


def migrate(conn: Connection) -> list[Migration]:
    """Apply every migration not yet recorded; return the ones applied now.

    Safe to run from many processes at once: a transaction-scoped advisory lock
    makes them take turns, and each re-reads the applied set after getting it,
    so the losers of the race find nothing left to do.
    """
    applied_now: list[Migration] = []
    top_level = conn.info.transaction_status == TransactionStatus.IDLE
    with conn.transaction():
        if top_level:
            # Under a REPEATABLE READ or SERIALIZABLE default the lock's own
            # statement would take the snapshot, before the previous holder
            # committed, and its migrations would be applied a second time.
            conn.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK_KEY,))
        conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} ("
                " version integer PRIMARY KEY,"
                " name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            ).format(sql.Identifier("schema_migrations"))
        )
        done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
        for migration in available_migrations():
            if migration.version in done:
                continue
            log.info("applying migration %04d_%s", migration.version, migration.name)
            try:
                # Migration files are trusted, versioned source, not user input.
                conn.execute(migration.sql.encode())
            except (errors.DuplicateTable, errors.DuplicateObject) as e:
                # Typically the upstream example's own schema (tables named events and
                # projection_checkpoints, of other columns): taking it over
                # would guess at data we did not write. The transaction rolls
                # back, so nothing of the migration stays.
                hint = (
                    " The database holds another schema (the upstream Go example makes `events` and "
                    "`projection_checkpoints`); projectionist does not adopt it. Use a database of "
                    "its own, or rename those tables first (ALTER TABLE events RENAME TO upstream_events)"
                    if migration.version == 1
                    else " Drop what was created by hand under that name, then migrate again"
                )
                raise MigrationError(
                    f"migration {migration.version:04d}_{migration.name} cannot run: "
                    f"{first_line(e)}, and schema_migrations does not record creating it.{hint}"
                ) from e
            except errors.LockNotAvailable as e:
                raise MigrationError(
                    f"migration {migration.version:04d}_{migration.name} gave up waiting for its lock "
                    "(a long query or transaction holds one on the table; see pg_stat_activity); "
                    "nothing was applied: run `projectionist migrate` again"
                ) from e
            conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                (migration.version, migration.name),
            )
            applied_now.append(migration)
    return applied_now


def applied_versions(conn: Connection) -> list[int]:
    exists = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return []
    return [row[0] for row in conn.execute("SELECT version FROM schema_migrations ORDER BY version")]


def pending_migrations(conn: Connection) -> list[Migration]:
    """The migrations this version has that the database has not applied."""
    done = set(applied_versions(conn))
    return [m for m in available_migrations() if m.version not in done]


def require_migrated(conn: Connection) -> None:
    """Raise :class:`NotMigratedError` unless every migration of this version is applied."""
    pending = pending_migrations(conn)
    if pending:
        names = ", ".join(f"{m.version:04d}_{m.name}" for m in pending)
        raise NotMigratedError(
            f"the database is not migrated ({len(pending)} pending: {names}); "
            "run `projectionist migrate` first"
        )
