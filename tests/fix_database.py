"""Fixtures: one real PostgreSQL per test session, a fresh migrated database per test.

The server is the embedded one unless DATABASE_URL is set, in which case that
server is used and each test gets its own database created on it. A test that
uses one of these fixtures must carry the ``integration`` marker, which means
"needs a real PostgreSQL server": collection fails otherwise, so that
``-m "not integration"`` selects only tests that run without one.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from projectionist.store.connection import Connection, connect
from projectionist.testing import PostgresServer
from tests.helpers import TEMPLATE_DB

#: The fixtures that need the session's server, directly or through another fixture.
SERVER_FIXTURES = frozenset({"pg_server", "db_url", "conn"})


# tryfirst: before `-m` deselects anything, so every collected test is checked.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Fail collection when a test uses the server without the ``integration`` marker."""
    unmarked = [
        item.nodeid
        for item in items
        if SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ()))
        and item.get_closest_marker("integration") is None
    ]
    if unmarked:
        raise pytest.UsageError(
            f"{len(unmarked)} test(s) use the PostgreSQL server ({', '.join(sorted(SERVER_FIXTURES))}) "
            "without the integration marker; add @pytest.mark.integration (or the module's pytestmark):\n  "
            + "\n  ".join(unmarked)
        )


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
