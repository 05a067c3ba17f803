"""Assembles a worker process's hooks and telemetry: logging, Prometheus metrics, health endpoints, traces.

:func:`build_hooks` gives the hook chain a :class:`~projectionist.worker.worker.Worker`
runs with; :func:`build_telemetry` builds what a process serves and exports.
Both are also the switch the benchmark uses to compare a worker with and
without instrumentation::

    plain = build_hooks(settings, [name])                      # logging only
    telemetry = build_telemetry(url, settings, [name], TelemetryOptions(metrics_port=0))
    with telemetry:                                            # HTTP server, pool, tracer
        Worker(url, projection, partition, hooks=build_hooks(settings, [name], telemetry),
               connect_fn=telemetry.connect_fn).run()
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from prometheus_client import CollectorRegistry
from psycopg_pool import ConnectionPool, PoolTimeout

from projectionist._version import __version__
from projectionist.errors import ConfigError
from projectionist.hooks import HookChain, WorkerHooks, WorkerInfo, WorkerState
from projectionist.settings import Settings, parse_positive_float, parse_positive_int
from projectionist.store.connection import Connection, connect
from projectionist.telemetry.health import DEFAULT_MAX_TICK_AGE, HealthHooks, HealthServer
from projectionist.telemetry.metrics import DEFAULT_LAG_COUNT_CAP, MetricsHooks, StoreCollector

log = logging.getLogger("projectionist.worker.worker")


class LoggingHooks(WorkerHooks):
    """Logs state changes, so an operator reading logs sees catching-up, live, failing."""

    def on_state(self, info: WorkerInfo, state: WorkerState, reason: str) -> None:
        level = logging.WARNING if state in (WorkerState.FAILING, WorkerState.STANDBY) else logging.INFO
        log.log(
            level,
            "%s worker %d/%d is %s (%s)",
            info.projection,
            info.worker_id,
            info.total_workers,
            state.value,
            reason,
        )


@dataclass(frozen=True, slots=True)
class TelemetryOptions:
    """How a worker process exposes itself. ``metrics_port`` ``None`` means no HTTP port and no metrics.

    Tracing is configured separately, by the standard ``OTEL_*`` variables.
    """

    metrics_port: int | None = None
    metrics_host: str = "0.0.0.0"
    health_max_tick_age: float = DEFAULT_MAX_TICK_AGE
    lag_count_cap: int = DEFAULT_LAG_COUNT_CAP
    revision: str = "unknown"

    def __post_init__(self) -> None:
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"METRICS_PORT={self.metrics_port} is not a TCP port")
        if not self.health_max_tick_age > 0:
            raise ConfigError(f"HEALTH_MAX_TICK_AGE={self.health_max_tick_age} must be greater than 0")
        if self.lag_count_cap < 1:
            raise ConfigError(f"LAG_COUNT_CAP={self.lag_count_cap} must be at least 1")

    @classmethod
    def from_env(
        cls, settings: Settings, environ: Mapping[str, str] | None = None, **overrides: Any
    ) -> TelemetryOptions:
        """``METRICS_PORT`` comes from ``settings``; the rest from ``HEALTH_MAX_TICK_AGE``,
        ``LAG_COUNT_CAP``, ``METRICS_HOST`` and ``PROJECTIONIST_REVISION``. Non-``None``
        ``overrides`` (command-line flags) win."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {"metrics_port": settings.metrics_port}
        if env.get("HEALTH_MAX_TICK_AGE", "").strip():
            values["health_max_tick_age"] = parse_positive_float(
                env["HEALTH_MAX_TICK_AGE"], "HEALTH_MAX_TICK_AGE"
            )
        if env.get("LAG_COUNT_CAP", "").strip():
            values["lag_count_cap"] = parse_positive_int(env["LAG_COUNT_CAP"], "LAG_COUNT_CAP")
        if env.get("METRICS_HOST", "").strip():
            values["metrics_host"] = env["METRICS_HOST"].strip()
        if env.get("PROJECTIONIST_REVISION", "").strip():
            values["revision"] = env["PROJECTIONIST_REVISION"].strip()
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


@dataclass
class Telemetry:
    """One process's telemetry: the hooks to run workers with, and what they need while running.

    Use it as a context manager (or :meth:`start`/:meth:`close`) around the
    workers: it opens the metrics pool, starts the HTTP server and, on exit,
    flushes the last spans.
    """

    hooks: list[WorkerHooks]
    connect_fn: Callable[..., Connection] = connect
    registry: CollectorRegistry | None = None
    metrics: MetricsHooks | None = None
    health: HealthHooks | None = None
    collector: StoreCollector | None = None
    tracer_provider: Any = None
    options: TelemetryOptions = field(default_factory=TelemetryOptions)
    server: HealthServer | None = None
    _pool: ConnectionPool[Any] | None = None
    _database_url: str | None = None

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
            if self._database_url is None:
                raise
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


# Long enough for a free connection's check; a pool busier than that is
# busy with scrapes, and /readyz connects on its own instead.
_PING_POOL_WAIT = 0.5


def build_telemetry(
    database_url: str,
    settings: Settings,
    projections: Sequence[str],
    options: TelemetryOptions | None = None,
    *,
    registry: CollectorRegistry | None = None,
    tracer_provider: Any = None,
    tracing_environ: Mapping[str, str] | None = None,
) -> Telemetry:
    """Build the telemetry a worker process runs with.

    Metrics and health exist when ``options.metrics_port`` is set (0 picks a
    free port). Tracing exists when ``tracer_provider`` is given, or when the
    ``OTEL_*`` environment (``tracing_environ``, default ``os.environ``) names
    an endpoint; such a provider is installed as the global one so projection
    code can trace too.
    """
    from opentelemetry import trace

    from projectionist.telemetry.tracing import TracingHooks, configure_tracing, traced_connect

    options = options or TelemetryOptions(metrics_port=settings.metrics_port)
    hooks: list[WorkerHooks] = []
    telemetry = Telemetry(hooks=hooks, options=options)
    if tracer_provider is None:
        tracer_provider = configure_tracing(tracing_environ)
        if tracer_provider is not None:
            trace.set_tracer_provider(tracer_provider)
            log.info("tracing on: exporting spans over OTLP/HTTP")
    if tracer_provider is not None:
        tracer = tracer_provider.get_tracer("projectionist", __version__)
        # First in the chain, so the batch span is current for the hooks after it.
        hooks.append(TracingHooks(tracer))
        telemetry.connect_fn = traced_connect(tracer)
        telemetry.tracer_provider = tracer_provider
    if options.metrics_port is not None:
        registry = registry if registry is not None else CollectorRegistry()
        metrics = MetricsHooks(registry, version=__version__, revision=options.revision)
        health = HealthHooks(max_tick_age=options.health_max_tick_age)
        # A small pool of its own: scrapes and readiness checks never touch
        # the workers' connections, which hold their locks and transactions.
        pool: ConnectionPool[Any] = ConnectionPool(
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
        collector = StoreCollector(pool, projections, lag_count_cap=options.lag_count_cap)
        registry.register(collector)
        hooks.extend([metrics, health])
        telemetry.registry = registry
        telemetry.metrics = metrics
        telemetry.health = health
        telemetry.collector = collector
        telemetry._pool = pool
        telemetry._database_url = database_url
    return telemetry


def build_hooks(
    settings: Settings, projections: Sequence[str], telemetry: Telemetry | None = None
) -> HookChain:
    """The hook chain for a worker: logging, then ``telemetry``'s hooks (traces before metrics)."""
    return HookChain([LoggingHooks(), *(telemetry.hooks if telemetry is not None else [])])
