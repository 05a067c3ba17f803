"""Shared fixtures: one real PostgreSQL per test session, a fresh database per test.

The server is the embedded one unless DATABASE_URL is set, in which case that
server is used and each test gets its own database created on it.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from projectionist.db import Connection, connect
from projectionist.migrate import migrate

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE_DB = "projectionist_test_template"

# Reusable fixtures: a local OTLP receiver, and a real Prometheus scraping real workers.
pytest_plugins = ["tests.fix_otlp", "tests.fix_prometheus"]


class Server:
    """The session's PostgreSQL: an admin URL and a way to make per-test databases."""

    def __init__(self, admin_url: str, embedded: object | None) -> None:
        self.admin_url = admin_url
        self.embedded = embedded

    def url_for(self, dbname: str) -> str:
        params = conninfo_to_dict(self.admin_url)
        params["dbname"] = dbname
        return make_conninfo(**params)  # type: ignore[arg-type]

    def admin(self) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(self.admin_url, autocommit=True)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Server]:
    url = os.environ.get("DATABASE_URL")
    embedded = None
    if not url:
        from projectionist.embedded import EmbeddedPostgres

        data_dir = Path(tempfile.mkdtemp(prefix="projectionist-test-pg-"))
        embedded = EmbeddedPostgres(
            data_dir / "data",
            settings={
                # Durability is not under test; speed is welcome.
                "fsync": "off",
                "full_page_writes": "off",
                "max_connections": "200",
            },
        )
        embedded.start()
        url = embedded.url
    server = Server(url, embedded)
    with server.admin() as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {TEMPLATE_DB} WITH (FORCE)")
        admin.execute(f"CREATE DATABASE {TEMPLATE_DB}")
    with connect(server.url_for(TEMPLATE_DB), autocommit=True) as conn:
        migrate(conn)
    try:
        yield server
    finally:
        if embedded is not None:
            embedded.destroy()  # type: ignore[attr-defined]


@contextlib.contextmanager
def fresh_database(server: Server, template: str | None = TEMPLATE_DB) -> Iterator[str]:
    """A new database (a copy of ``template``, or empty), dropped afterwards; yields its URL."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with server.admin() as admin:
        admin.execute(f"CREATE DATABASE {name}" + (f" TEMPLATE {template}" if template else ""))
    try:
        yield server.url_for(name)
    finally:
        with server.admin() as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def db_url(pg_server: Server) -> Iterator[str]:
    """A freshly migrated database of its own for this test."""
    with fresh_database(pg_server) as url:
        yield url


@pytest.fixture
def conn(db_url: str) -> Iterator[Connection]:
    with connect(db_url, autocommit=True) as c:
        yield c


def run_cli(
    *args: str, db_url: str | None = None, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m projectionist ARGS`` as a real subprocess."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("WORKER_ID", "TOTAL_WORKERS")}
    if db_url is not None:
        full_env["DATABASE_URL"] = db_url
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "projectionist", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=ROOT,
    )
