"""Error responses: one JSON shape, ``{"error": code, "message": text, ...}``, for every 4xx and 5xx."""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse


class ApiError(Exception):
    """A request the API refuses. Raised anywhere in a handler; rendered by :func:`error_response`."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers
        self.extra = extra


def error_response(error: ApiError) -> JSONResponse:
    body = {"error": error.code, "message": error.message, **error.extra}
    return JSONResponse(body, status_code=error.status, headers=error.headers)


def invalid(message: str, **extra: Any) -> ApiError:
    """422: the request is well-formed JSON but not a valid request."""
    return ApiError(422, "invalid_request", message, **extra)
