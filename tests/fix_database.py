"""Fixtures: one real PostgreSQL per test session, a fresh migrated database per test.

The server is the embedded one unless DATABASE_URL is set, in which case that
server is used and each test gets its own database created on it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from projectionist.store.connection import Connection, connect
from projectionist.testing import PostgresServer
from tests.helpers import TEMPLATE_DB


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    server = PostgresServer.from_env()
    server.create_database(TEMPLATE_DB, migrated=True)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def db_url(pg_server: PostgresServer) -> Iterator[str]:
    """A freshly migrated database of its own for this test."""
    with pg_server.fresh_database(TEMPLATE_DB) as url:
        yield url


@pytest.fixture
def conn(db_url: str) -> Iterator[Connection]:
    with connect(db_url, autocommit=True) as c:
        yield c
