"""Listeners every locustfile here shares: extra command-line options, the exporter, the thresholds.

:func:`register` is called by each locustfile at import; it registers once per
process, however many of our locustfiles ``-f`` loads. Imports no Locust.
"""

from __future__ import annotations

import logging
from typing import Any

from loadgen import judge
from locust_exporter import DEFAULT_PORT, install

log = logging.getLogger("loadtest")
_registered = False


def _add_options(parser: Any, **kwargs: Any) -> None:
    group = parser.add_argument_group("projectionist")
    group.add_argument(
        "--max-error-ratio",
        type=float,
        env_var="LOAD_MAX_ERROR_RATIO",
        default=0.01,
        help="fail the run (exit 1) above this ratio of failed requests (default 0.01)",
    )
    group.add_argument(
        "--max-p95-ms",
        type=float,
        env_var="LOAD_MAX_P95_MS",
        default=500.0,
        help="fail the run (exit 1) when the p95 response time is above this (default 500 ms)",
    )
    group.add_argument(
        "--min-requests",
        type=int,
        env_var="LOAD_MIN_REQUESTS",
        default=1,
        help="fail the run (exit 1) when fewer requests were made (default 1)",
    )
    group.add_argument(
        "--metrics-port",
        type=int,
        env_var="LOAD_METRICS_PORT",
        default=DEFAULT_PORT,
        help=f"serve Locust's stats for Prometheus on this port; 0 = off (default {DEFAULT_PORT})",
    )


def _on_init(environment: Any, **kwargs: Any) -> None:
    options = environment.parsed_options
    # Only processes that make requests fire events.request; a --master only aggregates.
    if options is not None and not getattr(options, "master", False):
        install(environment, options.metrics_port)


def _on_quitting(environment: Any, **kwargs: Any) -> None:
    options = environment.parsed_options
    if options is None or getattr(options, "worker", False):
        return
    total = environment.stats.total
    runner = getattr(environment, "runner", None)
    exceptions = sum(int(row.get("count", 1)) for row in (getattr(runner, "exceptions", None) or {}).values())
    verdict = judge(
        total.num_requests,
        total.num_failures,
        float(total.get_response_time_percentile(0.95) or 0.0),
        max_error_ratio=options.max_error_ratio,
        max_p95_ms=options.max_p95_ms,
        min_requests=options.min_requests,
        exceptions=exceptions,
    )
    summary = (
        f"{verdict.requests} requests, {verdict.failures} failed ({verdict.error_ratio:.2%}), "
        f"p95 {verdict.p95_ms:.0f} ms"
    )
    if verdict.ok:
        log.info("thresholds met: %s", summary)
        environment.process_exit_code = 0
    else:
        log.error("thresholds exceeded: %s; %s", summary, "; ".join(verdict.problems))
        environment.process_exit_code = 1


def register(events: Any) -> None:
    global _registered
    if _registered:
        return
    _registered = True
    events.init_command_line_parser.add_listener(_add_options)
    events.init.add_listener(_on_init)
    events.quitting.add_listener(_on_quitting)
