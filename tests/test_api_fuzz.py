"""Fuzzing the append API from its own OpenAPI document (schemathesis + hypothesis).

Valid and invalid requests are generated from the document the server serves,
sent over real HTTP to uvicorn, and checked: never a 5xx, every response as
documented, invalid data refused with a 4xx, and never a partial write: a
request that is not a 201 leaves the events table as it was, and a 201 adds
exactly the events it sent.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
)

from projectionist.api import ApiSettings, build_openapi, create_app
from projectionist.store.connection import Connection, connect
from projectionist.testing import PostgresServer
from tests.fix_api import ServedApp
from tests.helpers import TEMPLATE_DB

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Small limits so generated batches hit them; the document states the same ones.
SETTINGS = ApiSettings(max_body_bytes=64 * 1024, max_events=5, max_page_size=50)
SCHEMA = schemathesis.openapi.from_dict(build_openapi(SETTINGS))
CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance]
EXAMPLES = 150


@dataclass
class Target:
    url: str
    conn: Connection
    session: requests.Session

    def events(self) -> int:
        row = self.conn.execute("SELECT count(*) FROM events").fetchone()
        return int(row[0]) if row else 0


@pytest.fixture(scope="module")
def target(pg_server: PostgresServer) -> Iterator[Target]:
    # One server and database for the module: hypothesis runs hundreds of
    # examples per test, far too many for a database each.
    with pg_server.fresh_database(TEMPLATE_DB) as url:
        app = create_app(url, SETTINGS, registry=CollectorRegistry())
        with (
            ServedApp(app) as served,
            connect(url, autocommit=True) as conn,
            requests.Session() as session,
        ):
            yield Target(served.url, conn, session)


def _sent_events(case: Case) -> int:
    body: Any = case.body
    return len(body["events"])


def _call(target: Target, case: Case, checks: list[Any]) -> None:
    before = target.events()
    response = case.call(base_url=target.url, session=target.session, timeout=30)
    case.validate_response(response, checks=checks)
    after = target.events()
    if response.status_code == 201:
        assert after - before == _sent_events(case), "a 201 must add exactly the events it sent"
    else:
        assert after == before, f"a {response.status_code} response wrote {after - before} events"


FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
    ],
)


@FUZZ
@given(case=SCHEMA["/streams/{aggregate_id}/events"]["POST"].as_strategy(GenerationMode.POSITIVE))
def test_valid_appends_never_fail_on_the_server(target: Target, case: Case) -> None:
    _call(target, case, CHECKS)


@FUZZ
@given(case=SCHEMA["/streams/{aggregate_id}/events"]["POST"].as_strategy(GenerationMode.NEGATIVE))
def test_invalid_appends_are_refused_with_4xx_and_write_nothing(target: Target, case: Case) -> None:
    _call(target, case, [*CHECKS, negative_data_rejection])


@FUZZ
@given(
    case=st.one_of(
        SCHEMA["/streams/{aggregate_id}"]["GET"].as_strategy(GenerationMode.POSITIVE),
        SCHEMA["/streams/{aggregate_id}"]["GET"].as_strategy(GenerationMode.NEGATIVE),
    )
)
def test_reads_never_fail_on_the_server(target: Target, case: Case) -> None:
    _call(target, case, CHECKS)


def test_other_operations_answer_as_documented(target: Target) -> None:
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        case = SCHEMA[path]["GET"].Case()
        _call(target, case, CHECKS)
