"""Locust's request stats as Prometheus metrics, for the "Event store and load" dashboard.

Locust has no exporter of its own. :class:`LocustExporter` is an
``events.request`` listener that counts and times every request in a
prometheus-client registry; :func:`install` wires it up and serves the
registry with ``start_http_server`` from ``events.init``. Imports no Locust.

Metrics: ``locust_requests_total{method,name}``,
``locust_request_failures_total{method,name}``,
``locust_request_duration_seconds{method,name}`` (histogram) and
``locust_users`` (read from the runner at scrape time).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

DEFAULT_PORT = 9646
# Client-side latencies: from a millisecond to a 30 s timeout.
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _UsersCollector(Collector):
    """``locust_users``: known only when scraped, so read then rather than kept in a gauge."""

    def __init__(self, users: Callable[[], int]) -> None:
        self._users = users

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily("locust_users", "Users Locust is running right now.", value=self._users())


class LocustExporter:
    """Counts and times requests. ``name`` is Locust's request name, a route template in our locustfiles."""

    def __init__(self, registry: CollectorRegistry, users: Callable[[], int] = lambda: 0) -> None:
        self.registry = registry
        self.requests = Counter(
            "locust_requests", "Requests Locust made.", ["method", "name"], registry=registry
        )
        self.failures = Counter(
            "locust_request_failures",
            "Requests Locust counted as failed.",
            ["method", "name"],
            registry=registry,
        )
        self.duration = Histogram(
            "locust_request_duration_seconds",
            "Response time as Locust measured it (client side).",
            ["method", "name"],
            buckets=_BUCKETS,
            registry=registry,
        )
        registry.register(_UsersCollector(users))

    def on_request(
        self,
        request_type: str,
        name: str,
        response_time: float | None,
        response_length: int | None = None,
        exception: BaseException | None = None,
        **kwargs: Any,
    ) -> None:
        """The ``events.request`` listener. Locust reports ``response_time`` in milliseconds."""
        self.requests.labels(request_type, name).inc()
        if exception is not None:
            self.failures.labels(request_type, name).inc()
        if response_time is not None:
            self.duration.labels(request_type, name).observe(response_time / 1000.0)


def runner_users(environment: Any) -> Callable[[], int]:
    def users() -> int:
        runner = getattr(environment, "runner", None)
        return int(getattr(runner, "user_count", 0) or 0)

    return users


def install(environment: Any, port: int, host: str = "0.0.0.0") -> LocustExporter | None:
    """Attach an exporter to ``environment.events.request`` and serve it on ``port`` (0: do nothing)."""
    if port == 0:
        return None
    registry = CollectorRegistry()
    exporter = LocustExporter(registry, runner_users(environment))
    try:
        start_http_server(port, addr=host, registry=registry)
    except OSError as e:
        # Another Locust on this host (a second run, or --processes) holds the
        # port. The load is what the user asked for; the dashboard is extra,
        # so go on without it, loudly.
        log.warning(
            "Locust metrics are off in this process: cannot serve on %s:%d (%s); "
            "set LOAD_METRICS_PORT to a free port, or 0 to silence this",
            host,
            port,
            e.strerror or e,
        )
        return None
    environment.events.request.add_listener(exporter.on_request)
    log.info("Locust metrics on http://%s:%d/metrics", host, port)
    return exporter
