"""ASGI middleware: RED metrics per route template, and the optional bearer-token check."""

from __future__ import annotations

import hmac
import re
import time
from collections.abc import Sequence

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from projectionist.api.metrics import UNMATCHED_ROUTE, ApiMetrics

_CONVERTER = re.compile(r"\{(\w+):\w+\}")


def route_template(route: BaseRoute) -> str:
    """The OpenAPI spelling: ``/streams/{aggregate_id:aggregate_id}`` becomes ``/streams/{aggregate_id}``."""
    path = route.path if isinstance(route, Route) else UNMATCHED_ROUTE
    return _CONVERTER.sub(r"{\1}", path)


class MetricsMiddleware:
    """Counts and times every HTTP request, labelled by route template, method and status.

    The route is found here, before the request goes further, rather than read
    from the router afterwards: requests refused by the auth middleware never
    reach the router, and they must be counted under their route too.
    """

    def __init__(self, app: ASGIApp, *, metrics: ApiMetrics, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = list(routes)

    def _template(self, scope: Scope) -> str:
        partial: BaseRoute | None = None
        for route in self.routes:
            match, _ = route.matches(scope)
            if match == Match.FULL:
                return route_template(route)
            if match == Match.PARTIAL and partial is None:
                partial = route  # the path matched but not the method: a 405 of this route
        return route_template(partial) if partial is not None else UNMATCHED_ROUTE

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = self._template(scope)
        # If the app raises before starting a response, the server error
        # middleware outside us answers 500, so that is what gets counted.
        status = 500
        started = time.perf_counter()

        async def send_recording_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_recording_status)
        finally:
            self.metrics.observe(route, scope["method"], status, time.perf_counter() - started)


class BearerAuthMiddleware:
    """401 for requests without ``Authorization: Bearer <token>``, except on ``open_paths``."""

    def __init__(self, app: ASGIApp, *, token: str, open_paths: frozenset[str]) -> None:
        self.app = app
        self.token = token.encode("utf-8")
        self.open_paths = open_paths

    def _authorized(self, scope: Scope) -> bool:
        header = Headers(scope=scope).get("authorization", "")
        scheme, _, credentials = header.partition(" ")
        if scheme.lower() != "bearer":
            return False
        # Starlette decodes headers as latin-1; encoding back gives the raw bytes.
        # Constant-time comparison, so response timing does not leak the token.
        return hmac.compare_digest(credentials.strip().encode("latin-1"), self.token)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        response = JSONResponse(
            {"error": "unauthorized", "message": "this API needs an Authorization: Bearer <token> header"},
            status_code=401,
            headers={"WWW-Authenticate": 'Bearer realm="projectionist"'},
        )
        await response(scope, receive, send)
