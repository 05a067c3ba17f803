"""The append API as an ASGI application (Starlette), on a psycopg asyncio connection pool.

:func:`create_app` builds it; the pool opens and closes with the app's lifespan.
Handlers live in :mod:`projectionist.api.endpoints`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import psycopg
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from starlette.applications import Starlette
from starlette.convertors import Convertor, register_url_convertor
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from projectionist.api import endpoints
from projectionist.api.errors import ApiError, error_response
from projectionist.api.metrics import ApiMetrics
from projectionist.api.middleware import BearerAuthMiddleware, MetricsMiddleware
from projectionist.api.state import ApiState
from projectionist.errors import one_line
from projectionist.settings import ApiSettings
from projectionist.store.connection import AsyncConnection

log = logging.getLogger(__name__)

#: Paths that stay open when API_TOKEN is set: probes and scrapers carry no token,
#: and none of them reveals or changes events.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.json"})


class _AggregateIdConvertor(Convertor[str]):
    """Any text, slashes and newlines included, so a bad id reaches validation and gets 422.

    Starlette's ``path`` convertor is ``.*``, which stops at a newline and would
    turn an id with one into a 404.
    """

    regex = r"[\s\S]*"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("aggregate_id", _AggregateIdConvertor())


def default_registry() -> CollectorRegistry:
    """A registry with the process, platform and GC collectors, for a real server."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def create_app(
    database_url: str,
    settings: ApiSettings | None = None,
    *,
    registry: CollectorRegistry | None = None,
) -> Starlette:
    """The ASGI app. Give tests a fresh ``registry``; a server gets :func:`default_registry`."""
    settings = settings or ApiSettings()
    state = ApiState(database_url, settings, ApiMetrics(registry or default_registry()))
    routes = [
        Route("/streams/{aggregate_id:aggregate_id}/events", endpoints.append_events, methods=["POST"]),
        Route("/streams/{aggregate_id:aggregate_id}", endpoints.read_events, methods=["GET"]),
        Route("/healthz", endpoints.health, methods=["GET"]),
        Route("/readyz", endpoints.ready, methods=["GET"]),
        Route("/metrics", endpoints.metrics, methods=["GET"]),
        Route("/openapi.json", endpoints.openapi, methods=["GET"]),
    ]
    middleware = [Middleware(MetricsMiddleware, metrics=state.metrics, routes=routes)]
    if settings.token:
        middleware.append(Middleware(BearerAuthMiddleware, token=settings.token, open_paths=OPEN_PATHS))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        pool: AsyncConnectionPool[AsyncConnection] = AsyncConnectionPool(
            database_url,
            connection_class=psycopg.AsyncConnection[TupleRow],
            min_size=settings.pool_min_size,
            max_size=settings.pool_max_size,
            kwargs={"autocommit": True, "application_name": "projectionist-api"},
            name="projectionist-api",
            open=False,
        )
        # wait=False: start serving even while the database is down; /readyz
        # says 503 until it is reachable, and the pool keeps reconnecting.
        await pool.open(wait=False)
        state.pool = pool
        try:
            yield
        finally:
            state.pool = None
            await pool.close()

    app = Starlette(
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={
            ApiError: _api_error,
            HTTPException: _http_error,
            PoolTimeout: _unavailable,
            psycopg.OperationalError: _unavailable,
            psycopg.DataError: _data_error,
            Exception: _internal_error,
        },
    )
    app.state.api = state
    return app


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    codes = {404: "not_found", 405: "method_not_allowed"}
    return JSONResponse(
        {"error": codes.get(exc.status_code, "http_error"), "message": exc.detail},
        status_code=exc.status_code,
        headers=exc.headers,
    )


async def _unavailable(request: Request, exc: Exception) -> Response:
    log.warning("database unavailable: %s", one_line(exc))
    return error_response(
        ApiError(
            503,
            "database_unavailable",
            "the database is unreachable or busy; retry later",
            headers={"Retry-After": "1"},
        )
    )


async def _data_error(request: Request, exc: Exception) -> Response:
    # A value the validation let through but PostgreSQL refused. The append
    # ran in one transaction, so nothing was written: it is the client's input.
    return error_response(ApiError(422, "invalid_value", one_line(exc)))


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(ApiError(500, "internal_error", "unexpected server error"))
