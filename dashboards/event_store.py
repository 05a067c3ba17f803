"""The "Event store and load" dashboard: append rate, the append API, Locust, and table growth."""

from __future__ import annotations

from grafana_foundation_sdk.builders.dashboard import Dashboard

from dashboards.common import (
    Layout,
    Query,
    datasource_variable,
    new_dashboard,
    stat_panel,
    timeseries_panel,
)

UID = "projectionist-event-store"

HTTP = "projectionist_http_requests_total"
HTTP_DURATION = "projectionist_http_request_duration_seconds"


def _http_errors_by_route() -> str:
    # 5xx responses per route. A route that never failed has no 5xx series at
    # all; the "or ... * 0" arm shows it at 0 rather than as "No data".
    errors = f'sum by (route) (rate({HTTP}{{status=~"5.."}}[$__rate_interval]))'
    every = f"sum by (route) (rate({HTTP}[$__rate_interval]))"
    return f"{errors}\nor\n{every} * 0"


def _http_error_ratio() -> str:
    errors = f'sum(rate({HTTP}{{status=~"5.."}}[$__rate_interval]))'
    every = f"sum(rate({HTTP}[$__rate_interval]))"
    # Over "> 0": with no traffic the ratio is no data, not 0/0 = NaN.
    return f"({errors} or {every} * 0)\n/ ({every} > 0)"


def build() -> Dashboard:
    d = new_dashboard(
        UID,
        "Event store and load",
        "Appends into the event store: the append API's traffic, errors and latency, "
        "the Locust load generator, and the growth of the events table.",
        ["projectionist", "event-store", "load"],
    ).with_variable(datasource_variable())
    layout = Layout(d)

    layout.row("Overview")
    layout.panel(
        stat_panel(
            "Append rate",
            "Events appended per second through the append API.",
            "ops",
            [
                Query(
                    "sum(rate(projectionist_events_appended_total[$__rate_interval]))",
                    "events/s",
                    instant=True,
                )
            ],
        ),
        w=5,
        h=5,
    )
    layout.panel(
        stat_panel(
            "Events in the store",
            "The store's head position: the highest global_position handed out. Nothing is "
            "ever deleted, but an append that rolled back used a position too, so the count "
            "of events can be a little lower.",
            "short",
            [Query("max(projectionist_head_position)", "head", instant=True)],
        ),
        w=5,
        h=5,
    )
    layout.panel(
        stat_panel(
            "API requests/s",
            "HTTP requests per second served by the append API, all routes.",
            "reqps",
            [Query(f"sum(rate({HTTP}[$__rate_interval]))", "requests/s", instant=True)],
        ),
        w=5,
        h=5,
    )
    layout.panel(
        stat_panel(
            "API error ratio",
            "Share of API responses with a 5xx status.",
            "percentunit",
            [Query(_http_error_ratio(), "5xx ratio", instant=True)],
            thresholds=[(None, "green"), (0.01, "orange"), (0.05, "red")],
        ),
        w=4,
        h=5,
    )
    layout.panel(
        stat_panel(
            "Locust users",
            "Simulated users of the running Locust load test (compose profile 'load').",
            "short",
            [Query("sum(locust_users)", "users", instant=True)],
        ),
        w=5,
        h=5,
    )

    layout.row("Appends and table growth")
    layout.panel(
        timeseries_panel(
            "Append rate",
            "Events per second: appended through the API, and the growth of the store's "
            "head position (every writer, the API or not).",
            "ops",
            [
                Query(
                    "sum(rate(projectionist_events_appended_total[$__rate_interval]))",
                    "appended via API",
                ),
                Query("max(deriv(projectionist_head_position[$__rate_interval]))", "store head growth"),
            ],
        ),
        w=12,
        h=8,
    )
    layout.panel(
        timeseries_panel(
            "Events table growth",
            "Events in the store over time (its head position, as reported by the workers).",
            "short",
            [Query("max(projectionist_head_position)", "events")],
            min_value=None,
        ),
        w=12,
        h=8,
    )

    layout.row("Append API")
    layout.panel(
        timeseries_panel(
            "Requests/s by route and status",
            "HTTP requests per second by route, method and status code.",
            "reqps",
            [
                Query(
                    f"sum by (route, method, status) (rate({HTTP}[$__rate_interval]))",
                    "{{method}} {{route}} {{status}}",
                )
            ],
        ),
        w=8,
        h=8,
    )
    layout.panel(
        timeseries_panel(
            "5xx errors/s by route",
            "Server errors per second by route; 0 when the route served no 5xx.",
            "reqps",
            [Query(_http_errors_by_route(), "{{route}}")],
        ),
        w=8,
        h=8,
    )
    layout.panel(
        timeseries_panel(
            "Latency percentiles",
            "API response time percentiles over all routes (server side, from the request "
            "duration histogram).",
            "s",
            [
                Query(
                    f"histogram_quantile({q}, sum by (le) (rate({HTTP_DURATION}_bucket[$__rate_interval])))",
                    f"p{round(q * 100)}",
                )
                for q in (0.5, 0.95, 0.99)
            ],
        ),
        w=8,
        h=8,
    )

    layout.row("Load test (Locust)")
    layout.panel(
        timeseries_panel(
            "Locust users",
            "Simulated users over time, as Locust's load shape ramps them.",
            "short",
            [Query("sum(locust_users)", "users")],
        ),
        w=8,
        h=8,
    )
    layout.panel(
        timeseries_panel(
            "Locust response time p95",
            "95th percentile response time per request name, as Locust measured it "
            "(client side, so including the network).",
            "s",
            [
                Query(
                    "histogram_quantile(0.95, sum by (le, name) "
                    "(rate(locust_request_duration_seconds_bucket[$__rate_interval])))",
                    "{{name}}",
                )
            ],
        ),
        w=8,
        h=8,
    )
    layout.panel(
        timeseries_panel(
            "Locust requests and failures",
            "Requests and failed requests per second, as Locust counted them.",
            "reqps",
            [
                Query("sum(rate(locust_requests_total[$__rate_interval]))", "requests"),
                Query(
                    "sum(rate(locust_request_failures_total[$__rate_interval])) "
                    "or sum(rate(locust_requests_total[$__rate_interval])) * 0",
                    "failures",
                ),
            ],
        ),
        w=8,
        h=8,
    )
    return d
