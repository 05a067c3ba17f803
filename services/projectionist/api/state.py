"""What the API's handlers share: settings, metrics, and the pool of the app's lifespan."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from psycopg_pool import AsyncConnectionPool

from projectionist.api.errors import ApiError
from projectionist.api.metrics import ApiMetrics
from projectionist.settings import ApiSettings
from projectionist.store.connection import AsyncConnection


@dataclass(slots=True)
class ApiState:
    """What handlers need, on ``app.state.api``. The pool exists while the app's lifespan runs."""

    database_url: str
    settings: ApiSettings
    metrics: ApiMetrics
    pool: AsyncConnectionPool[AsyncConnection] | None = None

    def connection(self) -> contextlib.AbstractAsyncContextManager[AsyncConnection]:
        if self.pool is None:
            raise ApiError(503, "not_started", "the API is starting or stopping")
        return self.pool.connection(timeout=self.settings.pool_timeout)
