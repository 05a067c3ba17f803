"""The "Projection workers" dashboard: triage, lag, freshness, throughput, health, errors, PostgreSQL.

At the top, the triage table names each partition's cause
(:mod:`dashboards.triage`); below, the freshness objective
(:mod:`dashboards.freshness`), checkpoint lag, events processed and worker
health per worker, and what an operator needs next: which partitions have
no live owner, how long batches take (with exemplars that open the batch's
trace), what fails, what holds the read fence back, and PostgreSQL itself
(:mod:`dashboards.postgres`).
"""

from __future__ import annotations

from grafana_foundation_sdk.builders.dashboard import Dashboard
from grafana_foundation_sdk.models import dashboard as dash

from dashboards import freshness, postgres, triage
from dashboards.common import (
    Layout,
    Query,
    datasource_variable,
    new_dashboard,
    query_variable,
    stat_panel,
    state_timeline_panel,
    timeseries_panel,
)
from dashboards.ownership import add_ownership_row

UID = "projectionist-workers"

# Every worker selector in this dashboard. "All" in a variable means ".*".
SEL = 'projection=~"$projection", worker=~"$worker"'
PROJ = 'projection=~"$projection"'

# Every worker exports lag for every partition of its group (read from the
# checkpoints table), so the same (projection, worker) series arrives from
# several scrape targets: take the max, never the sum.
LAG_EVENTS = f"max by (projection, worker) (projectionist_lag_events{{{SEL}}})"
LAG_SECONDS = f"max by (projection, worker) (projectionist_lag_seconds{{{SEL}}})"

# Numeric codes for projectionist_worker_state, so a state timeline can show it.
STATE_CODES = {
    "starting": (1, "blue"),
    "standby": (2, "purple"),
    "catching_up": (3, "yellow"),
    "live": (4, "green"),
    "stopping": (5, "orange"),
    "failing": (6, "red"),
}


def _state_code_expr(by: str = "projection, worker, instance") -> str:
    """One series per ``by`` whose value is the code of its current state (the highest, across processes).

    The Enum exports one series per state, 1 for the current one and 0 for the
    others; multiplying each by its code and taking the max leaves the code.
    """
    parts = [
        f'projectionist_worker_state{{{SEL}, projectionist_worker_state="{state}"}} * {code}'
        for state, (code, _) in STATE_CODES.items()
    ]
    return f"max by ({by}) (\n  " + "\n  or ".join(parts) + "\n)"


def _state_mappings() -> dash.ValueMap:
    return dash.ValueMap(
        options={
            str(code): dash.ValueMappingResult(text=state, color=color, index=code)
            for state, (code, color) in STATE_CODES.items()
        }
    )


def _partitions_expr() -> str:
    # The number of partitions (TOTAL_WORKERS) as a value: the distinct worker
    # labels that the group's lag series cover.
    return f"count by (projection) (group by (projection, worker) (projectionist_lag_events{{{PROJ}}}))"


# Sums of "== bool 1", not counts of the ones: with no partition live or
# owned (an outage, exactly when the panel matters) a count has no series at
# all and the line vanished instead of showing 0.
def _live_expr() -> str:
    return (
        "sum by (projection) ("
        "max by (projection, worker) "
        f'(projectionist_worker_state{{{PROJ}, projectionist_worker_state="live"}}) == bool 1)'
    )


def _owned_expr() -> str:
    owned = f"max by (projection, worker) (projectionist_partition_owned{{{PROJ}}})"
    return f"sum by (projection) ({owned} == bool 1)"


def _indexed_expr() -> str:
    # A sum, not a count of the ones: 0 must show as 0, not as no data.
    return f"sum by (projection) (max by (projection, worker) (projectionist_partition_index_used{{{PROJ}}}))"


def build() -> Dashboard:
    d = (
        new_dashboard(
            UID,
            "Projection workers",
            "Lag, throughput, health and partition coverage of projectionist workers "
            "(one partition per worker, TOTAL_WORKERS partitions per projection).",
            ["projectionist", "workers"],
        )
        .with_variable(datasource_variable())
        .with_variable(
            query_variable(
                "projection",
                "Projection",
                "label_values(projectionist_worker_state, projection)",
                include_all=True,
                description="Projection (worker group) to show",
            )
        )
        .with_variable(
            query_variable(
                "worker",
                "Worker",
                # Every running process reports every partition's lag, so a
                # partition whose worker is stopped is still offered; the
                # worker's own state covers a database outage, when no lag is.
                'label_values({__name__=~"projectionist_lag_events|projectionist_worker_state", '
                f"{PROJ}}}, worker)",
                include_all=True,
                description="Partition number (WORKER_ID); a stopped partition is listed too",
            )
        )
    )
    layout = Layout(d)

    triage.add_row(layout, _state_code_expr("projection, worker, total_workers"), _state_mappings())
    layout.row("Overview")
    layout.panel(
        stat_panel(
            "Live partitions",
            "Partitions with an owner, with a caught-up (live) owner, and the partition count "
            "(TOTAL_WORKERS). Fewer owned than partitions means some aggregates are not being "
            "projected; owned but not live means catching up, or failing on an event.",
            "short",
            [
                Query(_owned_expr(), "owned {{projection}}", instant=True),
                Query(_live_expr(), "live {{projection}}", instant=True),
                Query(_partitions_expr(), "partitions {{projection}}", instant=True),
            ],
        ),
        w=6,
        h=5,
    )
    layout.panel(
        stat_panel(
            "Max lag (events)",
            "The largest lag of any selected partition: events in the store that its worker "
            "has not yet read.",
            "short",
            [Query(f"max({LAG_EVENTS})", "max lag", instant=True)],
            thresholds=[(None, "green"), (1000, "orange"), (10000, "red")],
        ),
        w=4,
        h=5,
    )
    layout.panel(
        stat_panel(
            "Max lag (time)",
            "Age of the oldest event any selected partition still has to process.",
            "s",
            [Query(f"max({LAG_SECONDS})", "max lag", instant=True)],
            thresholds=[(None, "green"), (30, "orange"), (300, "red")],
        ),
        w=4,
        h=5,
    )
    layout.panel(
        stat_panel(
            "Events/s",
            "Events applied per second by the selected workers, summed.",
            "ops",
            [
                Query(
                    f"sum(rate(projectionist_events_processed_total{{{SEL}}}[$__rate_interval]))",
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
            "Oldest open transaction",
            "Age of the oldest open transaction in the database. Readers cannot pass it "
            "(gap-safe read fence), so a long-open transaction stalls every worker.",
            "s",
            [Query("max(projectionist_oldest_transaction_age_seconds)", "oldest", instant=True)],
            thresholds=[(None, "green"), (10, "orange"), (60, "red")],
        ),
        w=5,
        h=5,
    )

    freshness.add_row(layout)
    layout.row("Lag")
    layout.panel(
        timeseries_panel(
            "Lag in events per worker",
            "Each partition's events not yet applied, counted at scrape time up to LAG_COUNT_CAP "
            "(max over reporting processes).",
            "short",
            [Query(LAG_EVENTS, "{{projection}} worker {{worker}}")],
        ),
        w=12,
        h=8,
    )
    layout.panel(
        timeseries_panel(
            "Lag in seconds per worker",
            "How old the oldest unprocessed event of each partition is; 0 when caught up.",
            "s",
            [Query(LAG_SECONDS, "{{projection}} worker {{worker}}")],
            thresholds=[(None, "green"), (30, "orange"), (300, "red")],
        ),
        w=12,
        h=8,
    )

    layout.row("Throughput")
    layout.panel(
        timeseries_panel(
            "Events/s per worker",
            "Events applied to the projection per second, per worker. Roughly equal shares "
            "mean the aggregates hash evenly over the partitions.",
            "ops",
            [
                Query(
                    "sum by (projection, worker) "
                    f"(rate(projectionist_events_processed_total{{{SEL}}}[$__rate_interval]))",
                    "{{projection}} worker {{worker}}",
                )
            ],
        ),
        w=12,
        h=8,
    )
    layout.panel(
        timeseries_panel(
            "Events/s in total",
            "All selected workers together against the store's growth: when processing "
            "stays below the append rate, lag grows.",
            "ops",
            [
                Query(
                    "sum by (projection) "
                    f"(rate(projectionist_events_processed_total{{{SEL}}}[$__rate_interval]))",
                    "processed {{projection}}",
                ),
                Query(
                    "max(deriv(projectionist_head_position[$__rate_interval]))",
                    "appended (store head growth)",
                ),
            ],
        ),
        w=12,
        h=8,
    )

    layout.row("Worker health")
    layout.panel(
        timeseries_panel(
            "Up",
            "1 when Prometheus scraped the worker process, 0 when the scrape failed. With static "
            "targets a stopped process shows 0; with DNS or Kubernetes discovery it drops out instead.",
            "none",
            [
                Query(
                    # The worker label comes from the process's own series; up
                    # (one per scrape target) is joined on instance. Worker
                    # series stay known for an hour, so a dead worker shows 0.
                    "group by (instance, worker) "
                    f"(last_over_time(projectionist_worker_state{{{SEL}}}[1h]))\n"
                    "* on (instance) group_left () max by (instance) (up)",
                    "worker {{worker}} ({{instance}})",
                )
            ],
            thresholds=[(None, "red"), (1, "green")],
        ),
        w=8,
        h=8,
    )
    layout.panel(
        state_timeline_panel(
            "Worker state",
            "Each process's state: starting, standby (another process owns the partition), "
            "catching_up, live, stopping or failing.",
            [Query(_state_code_expr(), "worker {{worker}} ({{instance}})")],
            _state_mappings(),
        ),
        w=16,
        h=8,
    )
    layout.panel(
        timeseries_panel(
            "Time since last progress",
            "Seconds since each partition's worker last moved its checkpoint. Growing while "
            "lag is above 0 means the worker is stalled.",
            "s",
            [
                Query(
                    "time() - max by (projection, worker) "
                    f"(projectionist_last_progress_timestamp_seconds{{{SEL}}})",
                    "{{projection}} worker {{worker}}",
                )
            ],
        ),
        w=12,
        h=8,
    )
    layout.panel(
        timeseries_panel(
            "Partition coverage",
            "Live workers against the partition count (TOTAL_WORKERS), partitions held "
            "by an owner process (the rest of a partition's processes are standbys), and "
            "partitions whose worker reads through its own partition index. Fewer indexed than "
            "partitions: build them with projectionist partition-index create.",
            "short",
            [
                Query(_partitions_expr(), "partitions (TOTAL_WORKERS) {{projection}}"),
                Query(_owned_expr(), "owned {{projection}}"),
                Query(_live_expr(), "live {{projection}}"),
                Query(_indexed_expr(), "read through their index {{projection}}"),
            ],
        ),
        w=12,
        h=8,
    )

    add_ownership_row(layout)

    layout.row("Batches")
    layout.panel(
        timeseries_panel(
            "Batch duration percentiles",
            "Time to read, apply and commit one batch. The dots are exemplars: click one "
            "to open that batch's trace.",
            "s",
            [
                Query(
                    f"histogram_quantile({q}, sum by (le, projection) "
                    f"(rate(projectionist_batch_duration_seconds_bucket{{{SEL}}}[$__rate_interval])))",
                    f"p{round(q * 100)} {{{{projection}}}}",
                    exemplar=True,
                )
                for q in (0.5, 0.95, 0.99)
            ],
        ),
        w=12,
        h=8,
    )
    layout.panel(
        timeseries_panel(
            "Batch size",
            "Events per batch: the mean, and the 95th percentile. Near BATCH_SIZE while "
            "catching up, small when live.",
            "short",
            [
                Query(
                    # Over "> 0": no batches is no data, not 0/0 = NaN.
                    "sum by (projection) "
                    f"(rate(projectionist_batch_size_sum{{{SEL}}}[$__rate_interval])) / "
                    "(sum by (projection) "
                    f"(rate(projectionist_batch_size_count{{{SEL}}}[$__rate_interval])) > 0)",
                    "mean {{projection}}",
                ),
                Query(
                    "histogram_quantile(0.95, sum by (le, projection) "
                    f"(rate(projectionist_batch_size_bucket{{{SEL}}}[$__rate_interval])))",
                    "p95 {{projection}}",
                ),
            ],
        ),
        w=12,
        h=8,
    )

    layout.row("Errors and database")
    layout.panel(
        timeseries_panel(
            "Errors by type",
            "Errors per second by type (database, projection, fenced ...). A projection "
            "error is retried with backoff and never skips the event.",
            "ops",
            [
                Query(
                    "sum by (projection, error_type) "
                    f"(rate(projectionist_errors_total{{{SEL}}}[$__rate_interval]))",
                    "{{projection}} {{error_type}}",
                )
            ],
        ),
        w=8,
        h=8,
    )
    layout.panel(
        timeseries_panel(
            "Oldest open transaction",
            "Age of the oldest open transaction. Workers read only below it, so lag in "
            "seconds can never be lower. Set idle_in_transaction_session_timeout.",
            "s",
            [Query("max(projectionist_oldest_transaction_age_seconds)", "oldest open transaction")],
            thresholds=[(None, "green"), (60, "red")],
        ),
        w=8,
        h=8,
    )
    layout.panel(
        timeseries_panel(
            "Wake-ups",
            "Why caught-up workers looked for new events: notify (an append's NOTIFY woke a "
            "sleeping worker; appends send one only while a worker sleeps), relay (another worker "
            "that found rows woke it), poll (a sleeping worker's poll interval), busy_poll (short "
            "looks while events keep coming). Under write load busy_poll dominates; only poll and "
            "relay at the start of bursts means appends' notifications are not arriving.",
            "ops",
            [
                Query(
                    f"sum by (source) (rate(projectionist_wakeups_total{{{SEL}}}[$__rate_interval]))",
                    "{{source}}",
                )
            ],
        ),
        w=8,
        h=8,
    )
    layout.panel(
        timeseries_panel(
            "Metrics connection pool",
            "Each worker process reads lag from PostgreSQL at scrape time through a small pool of "
            "its own (its batches use one dedicated connection). Requests waiting above 0 "
            "means scrapes queue for a connection.",
            "short",
            [
                Query(
                    f"max by (instance) ({name}) and on (instance) projectionist_worker_state{{{SEL}}}",
                    f"{legend} {{{{instance}}}}",
                )
                for name, legend in (
                    ("projectionist_db_pool_size", "open"),
                    ("projectionist_db_pool_available", "idle"),
                    ("projectionist_db_pool_requests_waiting", "waiting"),
                    ("projectionist_db_pool_max", "max"),
                )
            ],
        ),
        w=12,
        h=8,
    )
    layout.panel(
        timeseries_panel(
            "Parked events",
            "Open dead letters per projection (POISON_POLICY=park): failed events and the later "
            "events of the same aggregates parked behind them. Handle them with "
            "projectionist dead-letters list|show|retry|discard.",
            "short",
            [Query(f"max by (projection) (projectionist_parked_events{{{PROJ}}})", "{{projection}}")],
            thresholds=[(None, "green"), (1, "red")],
        ),
        w=6,
        h=8,
    )
    layout.panel(
        timeseries_panel(
            "Oldest parked event",
            "Age of the oldest open dead letter per projection; 0 when none. Its aggregates are "
            "frozen in the read model for that long.",
            "s",
            [
                Query(
                    f"max by (projection) (projectionist_oldest_parked_event_age_seconds{{{PROJ}}})",
                    "{{projection}}",
                )
            ],
        ),
        w=6,
        h=8,
    )
    postgres.add_row(layout)
    return d
