"""RED metrics of the append API, in a registry the caller owns.

Labels are bounded: ``route`` is the route *template* (``/streams/{aggregate_id}/events``),
never the raw path, so one label value per route however many aggregates there are;
requests that match no route share the value ``unmatched``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

UNMATCHED_ROUTE = "unmatched"
#: Methods get their own label value; anything else is counted as ``other``.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

# From 1 ms (a health check) to 10 s (a request stuck waiting for the pool).
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ApiMetrics:
    """``projectionist_http_*`` and ``projectionist_events_appended_total``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "projectionist_http_requests_total",
            "HTTP requests handled by the append API, by route template, method and status code.",
            ["route", "method", "status"],
            registry=registry,
        )
        self.duration = Histogram(
            "projectionist_http_request_duration_seconds",
            "Time from receiving an HTTP request to sending its last byte.",
            ["route", "method"],
            buckets=_BUCKETS,
            registry=registry,
        )
        self.events_appended = Counter(
            "projectionist_events_appended_total",
            "Events appended to the store through the API.",
            registry=registry,
        )

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        method = method if method in KNOWN_METHODS else "other"
        self.requests.labels(route, method, str(status)).inc()
        self.duration.labels(route, method).observe(seconds)
