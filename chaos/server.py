"""The suite's own PostgreSQL cluster: one database per scenario, and a server it may restart.

The database-restart scenario stops and starts the cluster under the
workers' feet, and the long-transaction scenario holds back every gap-safe
reader of the whole cluster. Neither may touch a server anybody else uses,
so the suite always runs its own embedded cluster.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from types import TracebackType

from projectionist.db import connect
from projectionist.embedded import EmbeddedPostgres
from projectionist.migrate import migrate

# Surviving an operating-system crash is not under test, so no fsync. Every
# commit is still in the WAL before it is acknowledged (synchronous_commit
# stays on), so even an immediate shutdown loses no acknowledged transaction.
# Enough connections for 9 workers, each with its metrics pool, plus load.
_SETTINGS = {
    "fsync": "off",
    "full_page_writes": "off",
    "max_connections": "200",
}


class ChaosServer:
    """An embedded PostgreSQL in ``base_dir`` (a fresh temporary directory by default)."""

    def __init__(self, base_dir: Path | None = None) -> None:
        self.base_dir = base_dir or Path(tempfile.mkdtemp(prefix="projectionist-chaos-"))
        self.pg = EmbeddedPostgres(self.base_dir / "pg", settings=_SETTINGS)
        self._databases = 0

    @property
    def admin_url(self) -> str:
        return str(self.pg.url)

    def start(self) -> None:
        self.pg.start()

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop -m MODE``: ``fast`` terminates sessions and shuts down cleanly, as an
        orchestrator's restart does; ``immediate`` aborts like a crash (recovery at the next start)."""
        self.pg.stop(mode)

    def server_version(self) -> str:
        with connect(self.admin_url, autocommit=True) as conn:
            row = conn.execute("SHOW server_version").fetchone()
        return str(row[0]) if row else "unknown"

    def fresh_database(self, label: str) -> str:
        """Create and migrate a new database for one scenario; returns its URL."""
        self._databases += 1
        name = f"chaos_{self._databases}_{label}"[:63]
        with connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
        url = str(self.pg.url_for(name))
        with connect(url, autocommit=True) as conn:
            migrate(conn)
        return url

    def wait_accepting(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with connect(self.admin_url, autocommit=True) as conn:
                    conn.execute("SELECT 1")
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def destroy(self) -> None:
        self.pg.destroy()

    def __enter__(self) -> ChaosServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.destroy()
