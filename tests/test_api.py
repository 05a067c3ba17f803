"""The append API over real HTTP (uvicorn) against real PostgreSQL: the contract, bad input, metrics, auth."""

from __future__ import annotations

import json
import math
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from projectionist.api import ApiSettings, build_openapi, create_app
from projectionist.errors import ConfigError
from projectionist.records import NewEvent
from projectionist.settings import Settings
from projectionist.store.appending import append
from projectionist.store.connection import Connection, connect
from projectionist.testing import PostgresServer
from tests.fix_api import ServedApp
from tests.helpers import TEMPLATE_DB

pytestmark = pytest.mark.integration

EVENTS_ROUTE = "/streams/{aggregate_id}/events"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@dataclass
class Api:
    client: httpx.Client
    registry: CollectorRegistry
    conn: Connection

    def events_in_store(self) -> int:
        row = self.conn.execute("SELECT count(*) FROM events").fetchone()
        return int(row[0]) if row else 0

    def requests(self, route: str, method: str, status: int) -> float:
        labels = {"route": route, "method": method, "status": str(status)}
        return self.registry.get_sample_value("projectionist_http_requests_total", labels) or 0.0


def _serve(db_url: str, settings: ApiSettings) -> Iterator[Api]:
    registry = CollectorRegistry()
    app = create_app(db_url, settings, registry=registry)
    with (
        ServedApp(app) as served,
        httpx.Client(base_url=served.url, timeout=30) as client,
        connect(db_url, autocommit=True) as conn,
    ):
        yield Api(client, registry, conn)


SETTINGS = ApiSettings(max_body_bytes=8192, max_events=10)


@pytest.fixture
def api(db_url: str) -> Iterator[Api]:
    yield from _serve(db_url, SETTINGS)


@pytest.fixture
def secured(db_url: str) -> Iterator[Api]:
    yield from _serve(db_url, ApiSettings(token="s3cret-token"))


@pytest.fixture(scope="module")
def shared(pg_server: PostgresServer) -> Iterator[Api]:
    """One server for the many requests that must be refused: each test checks that
    the number of stored events did not change, so they need no database each."""
    with pg_server.fresh_database(TEMPLATE_DB) as url:
        yield from _serve(url, SETTINGS)


def event(n: int = 0, **extra: Any) -> dict[str, Any]:
    return {"type": "Happened", "data": {"n": n}, **extra}


def post(api: Api, aggregate: str, body: Any, **kwargs: Any) -> httpx.Response:
    return api.client.post(f"/streams/{aggregate}/events", json=body, **kwargs)


# --- appending --------------------------------------------------------------


def test_append_returns_201_with_positions_stored_in_the_database(api: Api) -> None:
    r = post(api, "order-1", {"events": [event(1), event(2)], "expected_version": "no_stream"})
    assert r.status_code == 201
    body = r.json()
    assert body["aggregate_id"] == "order-1"
    assert body["version"] == 2
    stored = api.conn.execute(
        "SELECT global_position, aggregate_version, payload FROM events ORDER BY global_position"
    ).fetchall()
    assert [row[0] for row in stored] == body["global_positions"]
    assert [(row[1], row[2]) for row in stored] == [(1, {"n": 1}), (2, {"n": 2})]
    assert r.headers["location"] == "/streams/order-1?from_version=1"
    assert api.registry.get_sample_value("projectionist_events_appended_total") == 2


def test_exact_expected_version_and_conflict_with_current_version(api: Api) -> None:
    assert post(api, "a", {"events": [event()], "expected_version": 0}).status_code == 201
    assert post(api, "a", {"events": [event()], "expected_version": 1}).status_code == 201
    r = post(api, "a", {"events": [event()], "expected_version": 1})
    assert r.status_code == 409
    assert r.json()["error"] == "wrong_expected_version"
    assert r.json()["current_version"] == 2
    assert r.json()["expected_version"] == 1
    r = post(api, "a", {"events": [event()], "expected_version": "no_stream"})
    assert r.status_code == 409
    assert r.json()["current_version"] == 2
    assert r.json()["expected_version"] == "no_stream"
    assert api.events_in_store() == 2


def test_expected_version_defaults_to_any(api: Api) -> None:
    for n in range(3):
        assert post(api, "b", {"events": [event(n)]}).json()["version"] == n + 1


def test_client_event_ids_are_kept_and_a_repeated_id_is_a_conflict(api: Api) -> None:
    event_id = str(uuid.uuid4())
    assert post(api, "c", {"events": [event(id=event_id)]}).status_code == 201
    stored = api.conn.execute("SELECT event_id::text FROM events").fetchone()
    assert stored == (event_id,)
    r = post(api, "c", {"events": [event(id=event_id)]})
    assert r.status_code == 409
    assert r.json()["error"] == "duplicate_event_id"
    assert r.json()["current_version"] == 1
    assert api.events_in_store() == 1


def test_concurrent_appends_to_one_stream_get_distinct_consecutive_versions(api: Api) -> None:
    results: list[int] = []
    lock = threading.Lock()

    def writer() -> None:
        with httpx.Client(base_url=str(api.client.base_url), timeout=30) as client:
            for _ in range(10):
                r = client.post("/streams/hot/events", json={"events": [event()]})
                with lock:
                    results.append(r.status_code)

    threads = [threading.Thread(target=writer) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [201] * 50
    versions = [r[0] for r in api.conn.execute("SELECT aggregate_version FROM events ORDER BY 1")]
    assert versions == list(range(1, 51))


# --- bad input: a clear 4xx, and nothing written ------------------------------

RAW_BAD_BODIES: list[tuple[str, bytes, int, str]] = [
    ("malformed JSON", b'{"events": [', 400, "malformed_json"),
    ("not UTF-8", b'{"events": [{"type": "\xff", "data": {}}]}', 400, "malformed_json"),
    ("NaN literal", b'{"events": [{"type": "T", "data": {"x": NaN}}]}', 400, "malformed_json"),
    ("number out of range", b'{"events": [{"type": "T", "data": {"x": 1e400}}]}', 400, "malformed_json"),
    (
        "integer too long",
        b'{"events": [{"type": "T", "data": {"x": ' + b"9" * 4400 + b"}}]}",
        400,
        "malformed_json",
    ),
    ("empty body", b"", 400, "malformed_json"),
    (
        "NUL in a data string",
        b'{"events": [{"type": "T", "data": {"x": "a\\u0000b"}}]}',
        422,
        "invalid_request",
    ),
    ("NUL in a data key", b'{"events": [{"type": "T", "data": {"a\\u0000": 1}}]}', 422, "invalid_request"),
    ("lone surrogate", b'{"events": [{"type": "T", "data": {"x": "\\ud800"}}]}', 422, "invalid_request"),
    ("surrogate in type", b'{"events": [{"type": "\\udfff", "data": {}}]}', 422, "invalid_request"),
]

BAD_BODIES: list[tuple[str, Any, str]] = [
    ("body is an array", [event()], "invalid_request"),
    ("body is a string", "events", "invalid_request"),
    ("events missing", {"expected_version": "any"}, "invalid_request"),
    ("events not an array", {"events": event()}, "invalid_request"),
    ("empty batch", {"events": []}, "empty_batch"),
    ("too many events", {"events": [event(n) for n in range(11)]}, "batch_too_large"),
    ("unknown top-level field", {"events": [event()], "extra": 1}, "invalid_request"),
    ("event not an object", {"events": ["Happened"]}, "invalid_request"),
    ("type missing", {"events": [{"data": {}}]}, "invalid_request"),
    ("type not a string", {"events": [{"type": 7, "data": {}}]}, "invalid_request"),
    ("type empty", {"events": [{"type": "", "data": {}}]}, "invalid_request"),
    ("type too long", {"events": [{"type": "T" * 201, "data": {}}]}, "invalid_request"),
    ("type with control character", {"events": [{"type": "T\n", "data": {}}]}, "invalid_request"),
    ("data missing", {"events": [{"type": "T"}]}, "invalid_request"),
    ("data not an object", {"events": [{"type": "T", "data": [1]}]}, "invalid_request"),
    ("metadata not an object", {"events": [event(metadata="m")]}, "invalid_request"),
    ("id not a UUID", {"events": [event(id="not-a-uuid")]}, "invalid_request"),
    ("id as bare hex", {"events": [event(id=uuid.uuid4().hex)]}, "invalid_request"),
    ("id not a string", {"events": [event(id=12)]}, "invalid_request"),
    ("unknown event field", {"events": [event(payload={})]}, "invalid_request"),
    (
        "same id twice",
        {"events": [event(id=str(uuid.UUID(int=1))), event(id=str(uuid.UUID(int=1)))]},
        "invalid_request",
    ),
    ("expected_version a boolean", {"events": [event()], "expected_version": True}, "invalid_request"),
    ("expected_version negative", {"events": [event()], "expected_version": -1}, "invalid_request"),
    ("expected_version a float", {"events": [event()], "expected_version": 1.5}, "invalid_request"),
    ("expected_version unknown word", {"events": [event()], "expected_version": "latest"}, "invalid_request"),
    ("expected_version too big", {"events": [event()], "expected_version": 2**63}, "invalid_request"),
    (
        "nested too deeply",
        {"events": [{"type": "T", "data": json.loads('{"a":' * 70 + "1" + "}" * 70)}]},
        "invalid_request",
    ),
    # The first event is fine, the second is not: the batch is all or nothing.
    ("one bad event in a batch", {"events": [event(1), {"type": "T", "data": "x"}]}, "invalid_request"),
]


@pytest.mark.parametrize(
    ("case", "raw", "status", "code"), RAW_BAD_BODIES, ids=[c[0] for c in RAW_BAD_BODIES]
)
def test_bad_raw_bodies_are_refused_and_write_nothing(
    shared: Api, case: str, raw: bytes, status: int, code: str
) -> None:
    before = shared.events_in_store()
    r = shared.client.post("/streams/s/events", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert r.json()["error"] == code
    assert shared.events_in_store() == before


@pytest.mark.parametrize(("case", "body", "code"), BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
def test_invalid_requests_get_422_and_write_nothing(shared: Api, case: str, body: Any, code: str) -> None:
    before = shared.events_in_store()
    r = post(shared, "s", body)
    assert r.status_code == 422, r.text
    assert r.json()["error"] == code
    assert r.json()["message"]
    assert shared.events_in_store() == before


def test_oversized_body_with_content_length_gets_413(shared: Api) -> None:
    before = shared.events_in_store()
    big = {"events": [{"type": "T", "data": {"blob": "x" * 9000}}]}
    r = post(shared, "s", big)
    assert r.status_code == 413
    assert r.json()["error"] == "body_too_large"
    assert shared.events_in_store() == before


def test_oversized_chunked_body_gets_413(shared: Api) -> None:
    before = shared.events_in_store()
    # No Content-Length: the limit is enforced while the body streams in.
    chunks = [b'{"events": [{"type": "T", "data": {"blob": "', *([b"x" * 1000] * 10), b'"}}]}']
    r = shared.client.post(
        "/streams/s/events", content=iter(chunks), headers={"content-type": "application/json"}
    )
    assert "content-length" not in r.request.headers
    assert r.status_code == 413
    assert shared.events_in_store() == before


def test_body_at_the_limit_is_accepted(api: Api) -> None:
    prefix = b'{"events": [{"type": "T", "data": {"blob": "'
    suffix = b'"}}]}'
    raw = prefix + b"x" * (8192 - len(prefix) - len(suffix)) + suffix
    assert len(raw) == 8192
    r = api.client.post("/streams/s/events", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 201


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/x-www-form-urlencoded", "application/json; charset=latin-1", "json"],
)
def test_unknown_content_types_get_415(shared: Api, content_type: str | None) -> None:
    before = shared.events_in_store()
    headers = {"content-type": content_type} if content_type else {}
    raw = json.dumps({"events": [event()]}).encode()
    r = shared.client.post("/streams/s/events", content=raw, headers=headers)
    assert r.status_code == 415
    assert r.json()["error"] == "unsupported_media_type"
    assert shared.events_in_store() == before


def test_json_with_utf8_charset_is_accepted(api: Api) -> None:
    raw = json.dumps({"events": [event()]}).encode()
    r = api.client.post(
        "/streams/s/events", content=raw, headers={"content-type": "Application/JSON; charset=UTF-8"}
    )
    assert r.status_code == 201


@pytest.mark.parametrize(
    ("case", "path_id"),
    [
        ("too long", "x" * 256),
        ("NUL", "a%00b"),
        ("control character", "a%01b"),
        ("newline", "a%0Ab"),
        ("DEL", "a%7Fb"),
        ("empty", ""),
    ],
)
def test_bad_aggregate_ids_get_422_and_write_nothing(shared: Api, case: str, path_id: str) -> None:
    before = shared.events_in_store()
    r = post(shared, path_id, {"events": [event()]})
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "invalid_aggregate_id"
    assert shared.events_in_store() == before


def test_aggregate_ids_may_hold_slashes_and_unicode(api: Api) -> None:
    assert post(api, "tenant%2Forder-7", {"events": [event()]}).status_code == 201
    assert post(api, "caf%C3%A9", {"events": [event()]}).status_code == 201
    assert post(api, "x" * 255, {"events": [event()]}).status_code == 201
    ids = {r[0] for r in api.conn.execute("SELECT aggregate_id FROM events")}
    assert ids == {"tenant/order-7", "café", "x" * 255}
    r = api.client.get("/streams/tenant%2Forder-7")
    assert r.status_code == 200
    assert r.json()["aggregate_id"] == "tenant/order-7"


def test_conflict_writes_nothing(api: Api) -> None:
    post(api, "s", {"events": [event()]})
    r = post(api, "s", {"events": [event(), event()], "expected_version": 5})
    assert r.status_code == 409
    assert api.events_in_store() == 1


def test_unknown_routes_and_methods_are_json_errors(api: Api) -> None:
    r = api.client.get("/nope")
    assert r.status_code == 404
    assert r.json()["error"] == "not_found"
    r = api.client.put("/streams/s/events", json={})
    assert r.status_code == 405
    assert r.json()["error"] == "method_not_allowed"


# --- reading ---------------------------------------------------------------


def test_read_stream_pages_with_next_links(api: Api) -> None:
    post(api, "p", {"events": [event(n) for n in range(5)]})
    r = api.client.get("/streams/p", params={"limit": 2})
    page = r.json()
    assert r.status_code == 200
    assert [e["version"] for e in page["events"]] == [1, 2]
    assert [e["data"]["n"] for e in page["events"]] == [0, 1]
    assert page["next_from_version"] == 3
    seen = [e["version"] for e in page["events"]]
    while page["next"] is not None:
        page = api.client.get(page["next"]).json()
        seen += [e["version"] for e in page["events"]]
    assert seen == [1, 2, 3, 4, 5]
    assert page["next_from_version"] is None
    first = api.client.get("/streams/p").json()["events"][0]
    stored = api.conn.execute(
        "SELECT event_id::text, global_position FROM events ORDER BY 2 LIMIT 1"
    ).fetchone()
    assert (first["id"], first["global_position"]) == stored
    assert first["type"] == "Happened"


# The Python store keeps what json.dumps wrote, escapes included; a page
# holding such an event must not be a 500 (UTF-8 cannot encode a surrogate).
@pytest.mark.parametrize("text", ["\ud800", "a\udc00b"], ids=["high", "low"])
def test_read_stream_returns_lone_surrogates_the_python_store_wrote(api: Api, text: str) -> None:
    append(api.conn, "s", [NewEvent("E", {"s": text}), NewEvent("E", {"ok": True})])
    r = api.client.get("/streams/s")
    assert r.status_code == 200, r.text
    assert [e["data"] for e in json.loads(r.content)["events"]] == [{"s": text}, {"ok": True}]


# The json column takes numbers past double range (this API refuses them,
# a raw-SQL writer need not); Python reads them as inf, which JSON cannot say.
def test_read_stream_returns_numbers_past_double_range_that_raw_sql_stored(api: Api) -> None:
    append(api.conn, "big", [NewEvent("E", {})])
    api.conn.execute(
        """UPDATE events SET payload = '{"x": 1e400, "y": [-1e400, 2.5], "s": "\\"Infinity\\" "}'"""
    )
    r = api.client.get("/streams/big")
    assert r.status_code == 200, r.text
    (data,) = [e["data"] for e in json.loads(r.content)["events"]]
    assert data == {"x": math.inf, "y": [-math.inf, 2.5], "s": '"Infinity" '}


def test_read_beyond_the_end_is_empty_and_unknown_stream_is_404(api: Api) -> None:
    post(api, "p", {"events": [event()]})
    r = api.client.get("/streams/p", params={"from_version": 9})
    assert r.status_code == 200
    assert r.json()["events"] == []
    assert r.json()["next"] is None
    r = api.client.get("/streams/missing")
    assert r.status_code == 404
    assert r.json()["error"] == "stream_not_found"


@pytest.mark.parametrize(
    "params",
    [
        {"limit": "0"},
        {"limit": "1001"},
        {"limit": "ten"},
        {"from_version": "0"},
        {"from_version": "-1"},
        {"from_version": "1.5"},
        {"from_version": "9" * 30},
        {"limit": "+5"},
    ],
)
def test_bad_paging_parameters_get_422(api: Api, params: dict[str, str]) -> None:
    post(api, "p", {"events": [event()]})
    r = api.client.get("/streams/p", params=params)
    assert r.status_code == 422
    assert r.json()["error"] == "invalid_request"


# --- health, readiness, metrics, OpenAPI --------------------------------------


def test_health_and_readiness(api: Api) -> None:
    assert api.client.get("/healthz").json() == {"status": "ok"}
    assert api.client.get("/readyz").json() == {"status": "ready"}


def test_readyz_is_503_when_the_database_is_unreachable_and_appends_too(pg_server: Any) -> None:
    unreachable = "postgresql://postgres@127.0.0.1:1/nowhere?connect_timeout=1"
    app = create_app(unreachable, ApiSettings(pool_timeout=1.0), registry=CollectorRegistry())
    with ServedApp(app) as served, httpx.Client(base_url=served.url, timeout=30) as client:
        assert client.get("/healthz").status_code == 200
        r = client.get("/readyz")
        assert r.status_code == 503
        assert r.json()["status"] == "not_ready"
        r = client.post("/streams/s/events", json={"events": [event()]})
        assert r.status_code == 503
        assert r.json()["error"] == "database_unavailable"
        assert r.headers["retry-after"] == "1"


def test_readyz_is_503_on_an_unmigrated_database(pg_server: Any) -> None:
    with pg_server.fresh_database() as url:
        app = create_app(url, registry=CollectorRegistry())
        with ServedApp(app) as served:
            r = httpx.get(f"{served.url}/readyz", timeout=30)
        assert r.status_code == 503
        assert r.json() == {"status": "not_ready", "detail": "not migrated"}


def test_metrics_use_route_templates_never_raw_paths(api: Api) -> None:
    post(api, "secret-aggregate-42", {"events": [event(), event()]})
    post(api, "secret-aggregate-42", {"events": [event()], "expected_version": 0})
    post(api, "secret-aggregate-42", {"events": []})
    api.client.get("/streams/secret-aggregate-42")
    api.client.get("/no/such/route")
    assert api.requests(EVENTS_ROUTE, "POST", 201) == 1
    assert api.requests(EVENTS_ROUTE, "POST", 409) == 1
    assert api.requests(EVENTS_ROUTE, "POST", 422) == 1
    assert api.requests("/streams/{aggregate_id}", "GET", 200) == 1
    assert api.requests("unmatched", "GET", 404) == 1
    assert api.registry.get_sample_value("projectionist_events_appended_total") == 2
    count = api.registry.get_sample_value(
        "projectionist_http_request_duration_seconds_count", {"route": EVENTS_ROUTE, "method": "POST"}
    )
    assert count == 3
    text = api.client.get("/metrics").text
    assert "projectionist_http_requests_total{" in text
    assert "secret-aggregate-42" not in text
    assert "/no/such/route" not in text


def test_openapi_document_is_served_and_names_every_route(api: Api) -> None:
    doc = api.client.get("/openapi.json").json()
    assert doc == build_openapi(SETTINGS)
    assert doc["openapi"].startswith("3.")
    assert set(doc["paths"]) == {
        EVENTS_ROUTE,
        "/streams/{aggregate_id}",
        "/healthz",
        "/readyz",
        "/metrics",
        "/openapi.json",
    }
    assert doc["components"]["schemas"]["AppendRequest"]["properties"]["events"]["maxItems"] == 10


# --- trace context ------------------------------------------------------------


def test_incoming_traceparent_continues_into_stored_metadata(api: Api) -> None:
    r = post(
        api,
        "t",
        {"events": [event(), event(metadata={"user": "u1"})]},
        headers={"traceparent": TRACEPARENT, "tracestate": "vendor=abc"},
    )
    assert r.status_code == 201
    rows = api.conn.execute("SELECT metadata FROM events ORDER BY global_position").fetchall()
    for (metadata,) in rows:
        version, trace_id, parent_id, flags = metadata["traceparent"].split("-")
        # Same trace; the parent is our producer span when an SDK records
        # spans, or the caller's span itself when tracing is off.
        assert (version, trace_id, flags) == ("00", "0af7651916cd43dd8448eb211c80319c", "01")
        assert len(parent_id) == 16
        assert metadata["tracestate"] == "vendor=abc"
    assert rows[1][0]["user"] == "u1"


def test_without_or_with_a_malformed_traceparent_no_trace_is_invented(api: Api) -> None:
    post(api, "t", {"events": [event()]})
    post(api, "t", {"events": [event()]}, headers={"traceparent": "garbage"})
    for (metadata,) in api.conn.execute("SELECT metadata FROM events"):
        assert "traceparent" not in metadata


# --- bearer auth -----------------------------------------------------------------


def test_token_is_required_when_api_token_is_set(secured: Api) -> None:
    body = {"events": [event()]}
    r = post(secured, "s", body)
    assert r.status_code == 401
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert r.json()["error"] == "unauthorized"
    assert post(secured, "s", body, headers={"authorization": "Bearer wrong"}).status_code == 401
    assert post(secured, "s", body, headers={"authorization": "Basic s3cret-token"}).status_code == 401
    assert secured.client.get("/streams/s").status_code == 401
    assert secured.events_in_store() == 0
    assert secured.requests(EVENTS_ROUTE, "POST", 401) == 3
    ok = {"authorization": "Bearer s3cret-token"}
    assert post(secured, "s", body, headers=ok).status_code == 201
    assert secured.client.get("/streams/s", headers=ok).status_code == 200
    assert secured.events_in_store() == 1


def test_probes_metrics_and_openapi_stay_open_with_a_token(secured: Api) -> None:
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        assert secured.client.get(path).status_code == 200, path
    doc = secured.client.get("/openapi.json").json()
    assert doc["paths"][EVENTS_ROUTE]["post"]["security"] == [{"bearerAuth": []}]


# A secret mounted from a file often ends in a newline; HTTP strips a header
# value's whitespace, so such a token could never match: take it stripped.
def test_api_token_with_a_trailing_newline_is_refused_or_usable(db_url: str) -> None:
    # A secret mounted from a file usually ends with a newline.
    try:
        settings = Settings.from_env({"API_TOKEN": "s3cret\n"}).api
    except ConfigError as e:
        assert "API_TOKEN" in str(e)
        return
    app = create_app(db_url, settings, registry=CollectorRegistry())
    with ServedApp(app) as served:
        r = httpx.get(f"{served.url}/streams/s", headers={"Authorization": "Bearer s3cret"}, timeout=10)
    # The server started with auth on, yet no client can ever present that token.
    assert r.status_code != 401, "API_TOKEN was accepted but no Bearer header can match it"
