"""One process's telemetry, built whole from :class:`~projectionist.settings.TelemetryOptions`."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry
from psycopg_pool import ConnectionPool, PoolTimeout

from projectionist._version import __version__
from projectionist.errors import ConfigError
from projectionist.hooks import HookChain, WorkerHooks, WorkerInfo
from projectionist.settings import TelemetryOptions
from projectionist.store.connection import Connection, connect
from projectionist.telemetry.health import HealthHooks, HealthServer
from projectionist.telemetry.logs import LoggingHooks
from projectionist.telemetry.metrics import MetricsHooks
from projectionist.telemetry.store_collector import StoreCollector
from projectionist.telemetry.tracing import TracingHooks, configure_tracing, traced_connect

log = logging.getLogger(__name__)

# Long enough for a free connection's check; a pool busier than that is
# busy with scrapes, and /readyz connects on its own instead.
_PING_POOL_WAIT = 0.5


class Telemetry:
    """What a worker process serves and exports: its hooks, and what they need while it runs.

    Metrics and health exist when ``options.metrics_port`` is set (0 picks a
    free port). Tracing exists when ``tracer_provider`` is given, or when
    ``options.tracing`` says an OTLP endpoint is configured; such a provider
    is installed as the global one, so projection code can trace too.

    Use it as a context manager (or :meth:`start`/:meth:`close`) around the
    workers: it opens the metrics pool, starts the HTTP server and, on exit,
    flushes the last spans::

        with Telemetry(url, [projection.name], options) as telemetry:
            Worker(url, projection, partition, hooks=telemetry.hook_chain(),
                   connect_fn=telemetry.connect_fn).run()
    """

    def __init__(
        self,
        database_url: str,
        projections: Sequence[str],
        options: TelemetryOptions | None = None,
        *,
        registry: CollectorRegistry | None = None,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        self.options = options = options or TelemetryOptions()
        self._database_url = database_url
        #: The hooks telemetry adds to a worker's chain: traces first, so the
        #: batch span is current for the hooks after it.
        self.hooks: list[WorkerHooks] = []
        #: How workers connect: traced connections when tracing is on.
        self.connect_fn: Callable[..., Connection] = connect
        self.server: HealthServer | None = None
        if tracer_provider is None and options.tracing:
            tracer_provider = configure_tracing()
            trace.set_tracer_provider(tracer_provider)
            log.info("tracing on: exporting spans over OTLP/HTTP")
        self.tracer_provider = tracer_provider
        if tracer_provider is not None:
            tracer = tracer_provider.get_tracer("projectionist", __version__)
            self.hooks.append(TracingHooks(tracer))
            self.connect_fn = traced_connect(tracer)
        self.registry: CollectorRegistry | None = None
        self.metrics: MetricsHooks | None = None
        self.health: HealthHooks | None = None
        self._pool: ConnectionPool[Any] | None = None
        if options.metrics_port is not None:
            self.registry = registry if registry is not None else CollectorRegistry()
            self.metrics = MetricsHooks(self.registry, version=__version__, revision=options.revision)
            self.health = HealthHooks(max_tick_age=options.health_max_tick_age)
            # A small pool of its own: scrapes and readiness checks never touch
            # the workers' connections, which hold their locks and transactions.
            self._pool = ConnectionPool(
                database_url,
                min_size=1,
                max_size=2,
                open=False,
                name="projectionist-metrics",
                check=ConnectionPool.check_connection,
                kwargs={
                    "autocommit": True,
                    "application_name": "projectionist:metrics",
                    "connect_timeout": 5,
                    # A scrape must never hang on a lock or a slow plan.
                    "options": "-c statement_timeout=5000",
                },
            )
            self.registry.register(
                StoreCollector(self._pool, projections, lag_count_cap=options.lag_count_cap)
            )
            self.hooks.extend([self.metrics, self.health])

    def hook_chain(self) -> HookChain:
        """The chain a worker runs with: logging, then this telemetry's hooks."""
        return build_hooks(self)

    def register(self, info: WorkerInfo) -> None:
        """Announce a worker before it runs, so its series and health entry exist from the start."""
        if self.metrics is not None:
            self.metrics.register_worker(info)
        if self.health is not None:
            self.health.register_worker(info)

    def ping(self) -> None:
        """Raise unless the database answers (``/readyz``)."""
        if self._pool is None:
            return
        try:
            with self._pool.connection(timeout=_PING_POOL_WAIT) as conn:
                conn.execute("SELECT 1")
                return
        except PoolTimeout:
            pass
        # Both pooled connections are busy with scrapes (two Prometheus
        # replicas, a slow count): that says nothing about the database, and a
        # probe failing for it would mark the worker not ready. Ask it directly.
        with connect(self._database_url, autocommit=True, application_name="projectionist:readyz") as conn:
            conn.execute("SET statement_timeout = 2000")
            conn.execute("SELECT 1")

    def start(self) -> None:
        """Bind the HTTP port (a busy port raises :class:`ConfigError`) and open the metrics pool."""
        if self.registry is not None and self.health is not None and self.options.metrics_port is not None:
            host, port = self.options.metrics_host, self.options.metrics_port
            try:
                self.server = HealthServer(self.registry, self.health, port=port, host=host, ping=self.ping)
            except OSError as e:
                raise ConfigError(
                    f"METRICS_PORT={port}: cannot listen on {host}:{port} ({e.strerror})"
                ) from e
            self.server.start()
        if self._pool is not None:
            # Do not wait: a worker must start (and report not-ready) while the
            # database is down; the pool keeps trying in the background.
            self._pool.open(wait=False)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        if self._pool is not None:
            self._pool.close()
        if self.tracer_provider is not None:
            # Flushes the batch processor: the last batches' spans are not lost.
            self.tracer_provider.shutdown()

    def __enter__(self) -> Telemetry:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def build_hooks(telemetry: Telemetry | None = None) -> HookChain:
    """The hook chain for a worker: logging, then ``telemetry``'s hooks, if any.

    With no telemetry it is the uninstrumented worker the benchmark compares against.
    """
    return HookChain([LoggingHooks(), *(telemetry.hooks if telemetry is not None else [])])
