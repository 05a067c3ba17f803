"""The append API's settings: where to listen, request limits, the optional bearer token.

Parsed once from ``API_*`` environment variables; command-line flags override
them. Invalid values raise :class:`ConfigError` naming the variable, which the
CLI turns into exit code 2, like every other projectionist setting.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from projectionist.errors import ConfigError
from projectionist.settings import parse_positive_float, parse_positive_int


@dataclass(frozen=True, slots=True)
class ApiSettings:
    """Everything the HTTP service can be configured with (the database comes from :class:`Settings`)."""

    host: str = "0.0.0.0"
    port: int = 8000
    #: Largest request body accepted; larger ones get 413 before anything is parsed.
    max_body_bytes: int = 1_048_576
    #: Most events one POST may carry.
    max_events: int = 1000
    #: Largest page ``GET /streams/{aggregate_id}`` returns.
    max_page_size: int = 1000
    #: When set, every route but health, readiness, metrics and the OpenAPI document needs it.
    token: str | None = None
    pool_min_size: int = 1
    pool_max_size: int = 10
    #: Seconds a request waits for a pooled connection before it gets 503.
    pool_timeout: float = 5.0

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"API_PORT={self.port} is not a TCP port")
        if self.max_body_bytes < 1:
            raise ConfigError(f"API_MAX_BODY_BYTES={self.max_body_bytes} must be at least 1")
        if self.max_events < 1:
            raise ConfigError(f"API_MAX_EVENTS={self.max_events} must be at least 1")
        if self.max_page_size < 1:
            raise ConfigError(f"max_page_size={self.max_page_size} must be at least 1")
        if self.pool_min_size < 0 or self.pool_max_size < max(self.pool_min_size, 1):
            raise ConfigError(
                f"API_POOL_SIZE={self.pool_max_size} must be at least 1 and at least the minimum "
                f"({self.pool_min_size})"
            )
        if self.token is not None and not self.token.strip():
            raise ConfigError("API_TOKEN must not be blank (unset it to turn authentication off)")
        if self.token is not None and self.token != self.token.strip():
            # HTTP strips a header value's surrounding whitespace: no client could send it.
            raise ConfigError("API_TOKEN must not start or end with whitespace")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> ApiSettings:
        """Parse ``API_HOST``, ``API_PORT``, ``API_MAX_BODY_BYTES``, ``API_MAX_EVENTS``,
        ``API_TOKEN`` and ``API_POOL_SIZE``; ``overrides`` that are not ``None`` win."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        if env.get("API_HOST", "").strip():
            values["host"] = env["API_HOST"].strip()
        if env.get("API_PORT", "").strip():
            try:
                values["port"] = int(env["API_PORT"])
            except ValueError:
                raise ConfigError(f"API_PORT={env['API_PORT']!r} is not an integer") from None
        for var, field in (
            ("API_MAX_BODY_BYTES", "max_body_bytes"),
            ("API_MAX_EVENTS", "max_events"),
            ("API_POOL_SIZE", "pool_max_size"),
        ):
            if env.get(var, "").strip():
                values[field] = parse_positive_int(env[var], var)
        if env.get("API_POOL_TIMEOUT", "").strip():
            values["pool_timeout"] = parse_positive_float(env["API_POOL_TIMEOUT"], "API_POOL_TIMEOUT")
        if env.get("API_TOKEN"):
            # Like every other API_* value: a secret read from a file often ends in a newline.
            values["token"] = env["API_TOKEN"].strip() or env["API_TOKEN"]
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
