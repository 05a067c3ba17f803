"""The suite's own PostgreSQL cluster: one database per scenario, and a server it may restart.

The database-restart scenario stops and starts the cluster under the
workers' feet, and the long-transaction scenario holds back every gap-safe
reader of the whole cluster. Neither may touch a server anybody else uses,
so the suite always runs its own embedded cluster.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from projectionist.store.embedded import EmbeddedPostgres
from projectionist.testing import TEST_SERVER_SETTINGS, PostgresServer


class ChaosServer(PostgresServer):
    """An embedded PostgreSQL in ``base_dir`` (a fresh temporary directory by default), not yet started.

    ``settings`` replace the test server's (``TEST_SERVER_SETTINGS``).
    """

    def __init__(self, base_dir: Path | None = None, *, settings: Mapping[str, str] | None = None) -> None:
        self.base_dir = base_dir or Path(tempfile.mkdtemp(prefix="projectionist-chaos-"))
        self.pg = EmbeddedPostgres(self.base_dir / "pg", settings=dict(settings or TEST_SERVER_SETTINGS))
        super().__init__(self.pg.url, self.pg)
        self._databases = 0

    def start(self) -> None:
        self.pg.start()

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop -m MODE``: ``fast`` terminates sessions and shuts down cleanly, as an
        orchestrator's restart does; ``immediate`` aborts like a crash (recovery at the next start)."""
        self.pg.stop(mode)

    def scenario_database(self, label: str) -> str:
        """Create and migrate a new database for one scenario; returns its URL."""
        self._databases += 1
        return self.create_database(f"chaos_{self._databases}_{label}"[:63], migrated=True)

    def destroy(self) -> None:
        self.close()

    def __enter__(self) -> ChaosServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.destroy()
