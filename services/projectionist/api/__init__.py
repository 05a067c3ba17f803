"""The HTTP append API: ``POST /streams/{aggregate_id}/events`` and friends, served by uvicorn.

Run it with ``projectionist api``; embed it with :func:`create_app`.
"""

from __future__ import annotations

from projectionist.api.app import OPEN_PATHS, create_app, default_registry
from projectionist.api.errors import ApiError
from projectionist.api.openapi import build_openapi
from projectionist.api.server import serve
from projectionist.settings import ApiSettings

__all__ = [
    "OPEN_PATHS",
    "ApiError",
    "ApiSettings",
    "build_openapi",
    "create_app",
    "default_registry",
    "serve",
]
