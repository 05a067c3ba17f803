"""A real PostgreSQL to test against: ``DATABASE_URL``'s server, or an embedded one, and databases on it."""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from projectionist.errors import one_line
from projectionist.store.connection import Connection, connect
from projectionist.store.embedded import EmbeddedPostgres
from projectionist.store.schema import migrate
from projectionist.testing.processes import HarnessError
from projectionist.testing.waiting import wait_for

#: Durability is not under test, speed is welcome. Every commit is still in
#: the WAL before it is acknowledged (synchronous_commit stays on), so even an
#: immediate shutdown loses no acknowledged transaction. Enough connections
#: for a fleet of workers, each with its metrics pool, plus load.
TEST_SERVER_SETTINGS: Mapping[str, str] = {
    "fsync": "off",
    "full_page_writes": "off",
    "max_connections": "200",
}


class PostgresServer:
    """A server to create databases on, through ``admin_url``; ``embedded`` when it is one of ours."""

    def __init__(self, admin_url: str, embedded: EmbeddedPostgres | None = None) -> None:
        self.admin_url = admin_url
        self.embedded = embedded

    @classmethod
    def start_embedded(
        cls, base_dir: Path | None = None, settings: Mapping[str, str] = TEST_SERVER_SETTINGS
    ) -> PostgresServer:
        """A new embedded cluster in ``base_dir`` (a fresh temporary directory by default), started."""
        base_dir = base_dir or Path(tempfile.mkdtemp(prefix="projectionist-test-pg-"))
        embedded = EmbeddedPostgres(base_dir / "pg", settings=dict(settings))
        embedded.start()
        return cls(str(embedded.url), embedded)

    @classmethod
    def from_env(cls) -> PostgresServer:
        """``DATABASE_URL``'s server when it is set, else a new embedded one."""
        url = os.environ.get("DATABASE_URL")
        return cls(url) if url else cls.start_embedded()

    def url_for(self, dbname: str) -> str:
        params = conninfo_to_dict(self.admin_url)
        params["dbname"] = dbname
        return make_conninfo(**params)  # type: ignore[arg-type]

    def admin(self) -> Connection:
        return connect(self.admin_url, autocommit=True, application_name="projectionist:testing")

    def create_database(self, name: str, *, template: str | None = None, migrated: bool = False) -> str:
        """Drop database ``name`` if it exists and create it anew (a copy of ``template``); its URL."""
        statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template is not None:
            statement = sql.SQL("{} TEMPLATE {}").format(statement, sql.Identifier(template))
        try:
            with self.admin() as admin:
                admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
                admin.execute(statement)
        except Exception as e:
            raise HarnessError(f"cannot create database {name!r}: {one_line(e)}") from e
        url = self.url_for(name)
        if migrated:
            with connect(url, autocommit=True) as conn:
                migrate(conn)
        return url

    def drop_database(self, name: str) -> None:
        with self.admin() as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    @contextlib.contextmanager
    def fresh_database(self, template: str | None = None) -> Iterator[str]:
        """A new database of a random name (a copy of ``template``, or empty), dropped afterwards."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        url = self.create_database(name, template=template)
        try:
            yield url
        finally:
            self.drop_database(name)

    def server_version(self) -> str:
        """The server's version, as ``SHOW server_version`` gives it."""
        with self.admin() as conn:
            row = conn.execute("SHOW server_version").fetchone()
        return str(row[0]) if row else "unknown"

    def wait_accepting(self, timeout: float = 30) -> None:
        """Until the server takes connections again (after a restart)."""

        def accepting() -> bool:
            try:
                with self.admin() as conn:
                    conn.execute("SELECT 1")
                return True
            except Exception:
                return False

        wait_for(accepting, "the server to accept connections", timeout=timeout)

    def close(self) -> None:
        """Stop and delete the embedded cluster; a ``DATABASE_URL`` server is left as it is."""
        if self.embedded is not None:
            self.embedded.destroy()


def wait_until_readable(conn: Connection, timeout: float = 30) -> None:
    """Wait until every committed event is below the read horizon.

    The reader holds back what an older transaction might still precede, and
    xids are cluster-wide: an autoanalyze or another session anywhere on the
    server can fence a read taken right after a commit. Workers simply poll
    again; code that reads once has to wait the same way.
    """

    def readable() -> bool:
        row = conn.execute(
            "SELECT coalesce(max(transaction_id) < pg_snapshot_xmin(pg_current_snapshot()), true) FROM events"
        ).fetchone()
        return bool(row and row[0])

    wait_for(readable, "committed events to pass the read horizon", timeout=timeout, interval=0.02)
