"""The benchmark's PostgreSQL: a dedicated embedded server, or ``BENCH_DATABASE_URL``.

Every contestant gets its own database on this one server, so they share the
same settings, disk and caches, and run one after another, never at once.

The embedded server keeps PostgreSQL's default durability (``fsync=on``,
``synchronous_commit=on``, ``full_page_writes=on``): appends pay for a real WAL
flush at every commit, as they would in production. Three non-default settings,
none of which weakens durability, are documented in ``SERVER_SETTINGS``.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

# Why each one is set:
# - pg_stat_statements counts the rows each statement returned, which is how the
#   partitioned workload measures "rows fetched" on the server side. Tracking is
#   off by default and switched on only for the databases of that workload,
#   while it runs, so no other workload pays for it.
# - track_commit_timestamp records each transaction's commit time, so the
#   latency workload can measure from the append's commit to the projection's
#   commit on one clock, without a polling observer adding its own delay.
# - max_connections leaves room for 8 writers, 4 workers and the observers.
SERVER_SETTINGS: dict[str, str] = {
    "shared_preload_libraries": "pg_stat_statements",
    "pg_stat_statements.track": "none",
    "track_commit_timestamp": "on",
    "max_connections": "100",
}


@dataclass(frozen=True, slots=True)
class Machine:
    cores: int
    cpu_model: str
    memory_gib: float
    python: str
    postgres: str
    settings: dict[str, str]
    load_before: tuple[float, float, float]

    def describe(self) -> list[str]:
        loads = ", ".join(f"{x:.2f}" for x in self.load_before)
        interesting = ", ".join(f"{k}={v}" for k, v in self.settings.items())
        return [
            f"Machine: {self.cores} cores, {self.cpu_model}, {self.memory_gib:.0f} GiB RAM",
            f"PostgreSQL {self.postgres}; Python {self.python}",
            f"Server settings: {interesting}",
            f"Load average (1, 5, 15 min) when the run started: {loads}",
        ]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / (1024 * 1024)
    except OSError:
        pass
    return 0.0


class BenchServer:
    """Starts the embedded server (unless ``url`` is given) and hands out per-contestant databases."""

    def __init__(self, url: str | None = None) -> None:
        self._given_url = url
        self._embedded: Any = None
        self._tmp: Path | None = None
        self.admin_url = url or ""

    def __enter__(self) -> BenchServer:
        if self._given_url is None:
            from projectionist.store.embedded import EmbeddedPostgres

            self._tmp = Path(tempfile.mkdtemp(prefix="projectionist-bench-"))
            self._embedded = EmbeddedPostgres(self._tmp / "data", settings=SERVER_SETTINGS)
            self._embedded.start()
            self.admin_url = self._embedded.url
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._embedded is not None:
            self._embedded.destroy()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)

    @property
    def embedded(self) -> bool:
        return self._embedded is not None

    def url_for(self, dbname: str) -> str:
        params = conninfo_to_dict(self.admin_url)
        params["dbname"] = dbname
        return make_conninfo(**params)  # type: ignore[arg-type]

    def admin(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.admin_url, autocommit=True)

    def fresh_database(self, name: str) -> str:
        """Drop and create ``name``; return its URL."""
        with self.admin() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url_for(name)

    def setting(self, name: str) -> str:
        with self.admin() as conn:
            row = conn.execute("SELECT current_setting(%s, true)", (name,)).fetchone()
        return str(row[0]) if row and row[0] is not None else ""

    def has_pg_stat_statements(self) -> bool:
        return "pg_stat_statements" in self.setting("shared_preload_libraries")

    def machine(self) -> Machine:
        with self.admin() as conn:
            row = conn.execute("SHOW server_version").fetchone()
        names = [
            "fsync",
            "synchronous_commit",
            "full_page_writes",
            "wal_level",
            "shared_buffers",
            "track_commit_timestamp",
            "max_connections",
        ]
        settings = {n: self.setting(n) for n in names}
        if not self.embedded:
            settings["server"] = "BENCH_DATABASE_URL"
        return Machine(
            cores=os.cpu_count() or 0,
            cpu_model=cpu_model(),
            memory_gib=memory_gib(),
            python=platform.python_version(),
            postgres=str(row[0]) if row else "?",
            settings=settings,
            load_before=os.getloadavg(),
        )
