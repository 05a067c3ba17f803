"""``projectionist api`` as a real process: start-up migrations, configuration errors, exported traces."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from projectionist.store.connection import connect
from projectionist.testing import PostgresServer, free_port, start_api, wait_for_http
from tests.fix_otlp import OtlpReceiver, otlp_receiver  # noqa: F401  (a fixture)
from tests.helpers import run_cli

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


@pytest.fixture
def empty_db(pg_server: PostgresServer) -> Iterator[str]:
    """A database without any migration applied."""
    with pg_server.fresh_database() as url:
        yield url


def test_api_with_migrate_migrates_at_start_up_and_exports_spans_linked_to_the_stored_trace(
    empty_db: str,
    otlp_receiver: OtlpReceiver,  # noqa: F811
    tmp_path: Path,
) -> None:
    port = free_port()
    api = start_api(
        empty_db,
        port,
        tmp_path / "api.log",
        "--migrate",
        env={"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/healthz", api)
        assert httpx.get(f"{url}/readyz", timeout=10).status_code == 200
        r = httpx.post(
            f"{url}/streams/traced/events",
            json={"events": [{"type": "T", "data": {}}]},
            headers={"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"},
            timeout=10,
        )
        assert r.status_code == 201
        (server_span,) = otlp_receiver.wait_for(lambda s: s.span.kind == s.span.SPAN_KIND_SERVER)
        (producer,) = otlp_receiver.wait_for(lambda s: s.span.kind == s.span.SPAN_KIND_PRODUCER)
    finally:
        code = api.stop()
    assert code == 0, api.output()
    assert server_span.name == "POST /streams/{aggregate_id}/events"
    assert server_span.resource["service.name"] == "projectionist-api"
    assert server_span.span.trace_id.hex() == CALLER_TRACE
    assert server_span.span.parent_span_id.hex() == CALLER_SPAN
    assert producer.span.parent_span_id == server_span.span.span_id
    assert producer.attributes["messaging.system"] == "projectionist"
    assert producer.attributes["messaging.batch.message_count"] == 1
    with connect(empty_db) as conn:
        row = conn.execute("SELECT metadata->>'traceparent' FROM events").fetchone()
    # The stored context is the producer span: what a worker's batch span links to.
    assert row == (f"00-{CALLER_TRACE}-{producer.span.span_id.hex()}-01",)


@pytest.mark.parametrize("args", [(), ("--no-migrate",)], ids=["default", "no-migrate"])
def test_without_migrate_an_empty_database_is_not_ready(
    empty_db: str, tmp_path: Path, args: tuple[str, ...]
) -> None:
    # Migrating is a step of its own; the API serves meanwhile, not ready.
    port = free_port()
    api = start_api(empty_db, port, tmp_path / "api.log", *args)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/healthz", api)
        r = httpx.get(f"{url}/readyz", timeout=10)
        assert r.status_code == 503
        assert r.json()["detail"] == "not migrated"
    finally:
        api.stop()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"API_PORT": "http"}, "API_PORT='http' is not an integer"),
        ({"API_PORT": "70000"}, "API_PORT=70000 is not a TCP port"),
        ({"API_MAX_BODY_BYTES": "0"}, "API_MAX_BODY_BYTES='0' must be at least 1"),
        ({"API_TOKEN": "   "}, "API_TOKEN must not be blank"),
        ({"API_POOL_TIMEOUT": "inf"}, "API_POOL_TIMEOUT='inf' must be a finite number greater than 0"),
    ],
)
def test_invalid_settings_exit_2_naming_the_variable(db_url: str, env: dict[str, str], message: str) -> None:
    result = run_cli("api", db_url=db_url, env=env)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
