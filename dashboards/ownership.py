"""The "Ownership" row of the workers dashboard: who owns the partitions, and how they move.

In elastic mode partitions move between worker processes as processes join
and leave; these panels show each process's share, the group's members, the
moves by reason, and the partitions without an owner (a move in progress,
or no worker at all). Static workers count their takeovers here too.
"""

from __future__ import annotations

from dashboards.common import Layout, Query, timeseries_panel

PROJ = 'projection=~"$projection"'


def _unowned_expr() -> str:
    # Partitions the group's lag series cover, minus those an owner process reports 1 for.
    partitions = f"count by (projection) (group by (projection, worker) (projectionist_lag_events{{{PROJ}}}))"
    owner = f"max by (projection, worker) (projectionist_partition_owned{{{PROJ}}})"
    # A count, not a sum (the lag series must never be summed); "or ... * 0" when none is owned.
    owned = f"count by (projection) ({owner} == 1)"
    return f"{partitions} - ({owned} or {partitions} * 0)"


def add_ownership_row(layout: Layout) -> None:
    layout.row("Ownership")
    layout.panel(
        timeseries_panel(
            "Partitions owned per process",
            "Elastic mode: the partitions each worker process owns (a fair share, within one of "
            "the others'), and the members of the group. Owned partitions move when a process "
            "joins or leaves; a process beyond the partition count owns none.",
            "short",
            [
                Query(
                    f"sum by (projection, instance) (projectionist_partitions_owned{{{PROJ}}})",
                    "{{projection}} {{instance}}",
                ),
                Query(
                    f"max by (projection) (projectionist_group_members{{{PROJ}}})",
                    "members {{projection}}",
                ),
            ],
        ),
        w=12,
        h=8,
    )
    layout.panel(
        timeseries_panel(
            "Ownership changes",
            "Partitions taken and let go, by reason: assigned (an elastic member's fair share), "
            "revoked (released above its share), stopped (graceful stop), lost (the session "
            "ended), acquired (a static worker or standby took its partition). Rebalances: "
            "changes of the member list. Unowned: partitions no process holds right now.",
            "short",
            [
                Query(
                    "sum by (projection, reason) "
                    f"(increase(projectionist_ownership_changes_total{{{PROJ}}}[$__rate_interval]))",
                    "{{reason}} {{projection}}",
                ),
                Query(
                    "max by (projection) "
                    f"(increase(projectionist_rebalances_total{{{PROJ}}}[$__rate_interval]))",
                    "rebalances {{projection}}",
                ),
                Query(_unowned_expr(), "unowned {{projection}}"),
            ],
        ),
        w=12,
        h=8,
    )
