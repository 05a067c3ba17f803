"""The "PostgreSQL" row: the database itself, from the community postgres_exporter's standard series.

Standard names (``pg_up``, ``pg_stat_activity_count``, ``pg_stat_database_*``,
``pg_locks_count``, ``pg_stat_checkpointer_*``), so dashboards and alerts
people already have for PostgreSQL read the same series. Only the lock waits
come from a custom query, ``deploy/postgres-exporter/queries.yaml``.
"""

from __future__ import annotations

from dashboards.common import Layout, Query, timeseries_panel


def add_row(layout: Layout) -> None:
    layout.row("PostgreSQL")
    layout.panel(
        timeseries_panel(
            "PostgreSQL up",
            "1 while postgres_exporter can connect to PostgreSQL, 0 while it cannot: every worker and "
            "the API are then failing.",
            "none",
            [Query("min by (instance) (pg_up)", "{{instance}}")],
            thresholds=[(None, "red"), (1, "green")],
        ),
        w=6,
        h=8,
    )
    layout.panel(
        timeseries_panel(
            "Connections by state",
            "Client sessions by state, stacked, against max_connections. Near the maximum, new "
            "connections are refused: a worker that lost its connection cannot get one back.",
            "short",
            [
                Query("sum by (state) (pg_stat_activity_count)", "{{state}}"),
                Query("max(pg_settings_max_connections)", "max_connections"),
            ],
        ),
        w=9,
        h=8,
    )
    layout.panel(
        timeseries_panel(
            "Commits and rollbacks/s",
            "Transactions per second over every database of the server. Workers commit one per batch; "
            "rollbacks are failed batches, failed appends and other clients' aborts.",
            "ops",
            [
                Query("sum(rate(pg_stat_database_xact_commit[$__rate_interval]))", "commits"),
                Query("sum(rate(pg_stat_database_xact_rollback[$__rate_interval]))", "rollbacks"),
            ],
        ),
        w=9,
        h=8,
    )
    layout.panel(
        timeseries_panel(
            "Locks",
            "Locks held or awaited, by mode, and lock requests waiting for another session's lock. "
            "Waiting locks while batches slow down mean a lock held on a read-model table.",
            "short",
            [
                Query("sum by (mode) (pg_locks_count)", "{{mode}}"),
                Query("sum(pg_locks_waiting_count)", "waiting"),
            ],
        ),
        w=6,
        h=8,
    )
    layout.panel(
        timeseries_panel(
            "Deadlocks",
            "Deadlocks detected per second. PostgreSQL aborts one of the transactions; a worker "
            "retries its batch.",
            "ops",
            [Query("sum(rate(pg_stat_database_deadlocks[$__rate_interval]))", "deadlocks")],
        ),
        w=6,
        h=8,
    )
    layout.panel(
        timeseries_panel(
            "Longest transaction",
            "Age of the oldest open transaction by session state. A long one idle in transaction "
            "fences every gap-safe reader; set idle_in_transaction_session_timeout.",
            "s",
            [Query("max by (state) (pg_stat_activity_max_tx_duration)", "{{state}}")],
        ),
        w=6,
        h=8,
    )
    layout.panel(
        timeseries_panel(
            "Checkpoints",
            "Checkpoints per second: requested ones happen because WAL grew past max_wal_size (write "
            "pressure), timed ones every checkpoint_timeout. From pg_stat_checkpointer on PostgreSQL "
            "17 and later (the exporter's --collector.stat_checkpointer), pg_stat_bgwriter before.",
            "ops",
            [
                Query(
                    "sum(rate(pg_stat_checkpointer_num_requested_total[$__rate_interval]))"
                    " or sum(rate(pg_stat_bgwriter_checkpoints_req_total[$__rate_interval]))",
                    "requested",
                ),
                Query(
                    "sum(rate(pg_stat_checkpointer_num_timed_total[$__rate_interval]))"
                    " or sum(rate(pg_stat_bgwriter_checkpoints_timed_total[$__rate_interval]))",
                    "timed",
                ),
            ],
        ),
        w=6,
        h=8,
    )
    layout.panel(
        timeseries_panel(
            "Cache hit ratio",
            "Share of block reads served from shared buffers. A drop means the working set no longer "
            "fits in memory and reads go to disk.",
            "percentunit",
            [
                Query(
                    "sum(rate(pg_stat_database_blks_hit[$__rate_interval])) / ("
                    "sum(rate(pg_stat_database_blks_hit[$__rate_interval]))"
                    " + sum(rate(pg_stat_database_blks_read[$__rate_interval])) > 0)",
                    "hit ratio",
                )
            ],
            min_value=None,
        ),
        w=24,
        h=6,
    )
