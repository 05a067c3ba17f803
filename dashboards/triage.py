"""The triage panels, and the causes the triage rules name in their order of precedence.

``deploy/prometheus/rules/projectionist-triage.yml`` computes
``projectionist:partition_cause``, whose ``cause`` label is one of these
names and whose value is the cause's rank; ``docs/operate/triage.md`` says
what to do about each. The tests hold the three to the same list.
"""

from __future__ import annotations

from dataclasses import dataclass

from grafana_foundation_sdk.models import dashboard as dash

from dashboards.common import Layout, Query, state_timeline_panel, table_panel


@dataclass(frozen=True, slots=True)
class Cause:
    """One value of the ``cause`` label: its rank (the series' value), and how the table shows it."""

    name: str
    rank: int
    text: str
    color: str


#: Highest rank first: the order in which the rules test them.
CAUSES = (
    Cause("database_unreachable", 11, "database unreachable", "dark-red"),
    Cause("database_saturated", 10, "database saturated", "dark-purple"),
    Cause("no_owner", 9, "no owner", "red"),
    Cause("failing_event", 8, "failing event", "semi-dark-red"),
    Cause("open_transaction", 7, "open transaction", "purple"),
    Cause("slow_apply", 6, "slow apply", "dark-orange"),
    Cause("under_provisioned", 5, "under-provisioned", "orange"),
    Cause("hot_partition", 4, "hot partition", "dark-yellow"),
    Cause("polling_only", 3, "polling only", "light-blue"),
    Cause("catching_up", 2, "catching up", "blue"),
    Cause("lagging", 1, "lagging", "yellow"),
    Cause("ok", 0, "ok", "green"),
)

BY_NAME = {cause.name: cause for cause in CAUSES}
BY_RANK = {cause.rank: cause for cause in CAUSES}


# -- the panels ----------------------------------------------------------------------


#: Every partition's row; "All" in a variable means ".*".
_SEL = 'projection=~"$projection", worker=~"$worker"'
_BY = "projection, worker, total_workers"

#: The table's columns, by the query (refId) each comes from; the lab reads these names back.
COLUMNS = {
    "Value #A": "lag (s)",
    "Value #B": "state",
    "instance": "owner",
    "Value #D": "failing at position",
    "cause": "cause",
}


def cause_mappings() -> dash.ValueMap:
    """The ``cause`` label's names as coloured text."""
    return dash.ValueMap(
        options={
            c.name: dash.ValueMappingResult(text=c.text, color=c.color, index=i) for i, c in enumerate(CAUSES)
        }
    )


def rank_mappings() -> dash.ValueMap:
    """The cause's rank (``projectionist:partition_cause``'s value) as the cause's coloured text."""
    return dash.ValueMap(
        options={
            str(c.rank): dash.ValueMappingResult(text=c.text, color=c.color, index=i)
            for i, c in enumerate(CAUSES)
        }
    )


def add_row(layout: Layout, state_code_expr: str, state_mappings: dash.ValueMap) -> None:
    """The triage table and the cause over time, at the top of the workers dashboard."""
    layout.row("Triage")
    transformations = [
        # One frame per query, merged on the partition's labels.
        dash.DataTransformerConfig(id_val="merge", options={}),
        dash.DataTransformerConfig(id_val="sortBy", options={"sort": [{"field": "Value #E", "desc": True}]}),
        dash.DataTransformerConfig(
            id_val="organize",
            options={
                "excludeByName": {"Time": True, "Value #C": True, "Value #E": True},
                "renameByName": COLUMNS,
                "indexByName": {
                    name: i
                    for i, name in enumerate(
                        ["projection", "total_workers", "worker", *COLUMNS, "Value #C", "Value #E", "Time"]
                    )
                },
            },
        ),
    ]
    panel = (
        table_panel(
            "Triage",
            "One row per partition, worst first: the age of its oldest unapplied event, its worker's "
            "state, the process that owns it, the global position it fails on (POISON_POLICY=stop), "
            "and the cause the triage rules name (deploy/prometheus/rules/projectionist-triage.yml; "
            "what each means and what to do: docs/operate/triage.md).",
            [
                Query(f"max by ({_BY}) (projectionist_lag_seconds{{{_SEL}}})", instant=True, table=True),
                Query(f"max by ({_BY}) ({state_code_expr})", instant=True, table=True),
                Query(
                    f"max by ({_BY}, instance) (projectionist_partition_owned{{{_SEL}}} == 1)",
                    instant=True,
                    table=True,
                ),
                Query(
                    f"max by ({_BY}) (projectionist_poison_event_position{{{_SEL}}})",
                    instant=True,
                    table=True,
                ),
                Query(f"projectionist:partition_cause{{{_SEL}}}", instant=True, table=True),
            ],
            transformations,
        )
        .override_by_name("lag (s)", [dash.DynamicConfigValue(id_val="unit", value="s")])
        .override_by_name(
            "state",
            [
                dash.DynamicConfigValue(id_val="mappings", value=[state_mappings]),
                dash.DynamicConfigValue(id_val="custom.cellOptions", value={"type": "color-text"}),
            ],
        )
        .override_by_name(
            "failing at position",
            [
                dash.DynamicConfigValue(
                    id_val="mappings",
                    value=[dash.ValueMap(options={"0": dash.ValueMappingResult(text="-", index=0)})],
                )
            ],
        )
        .override_by_name(
            "cause",
            [
                dash.DynamicConfigValue(id_val="mappings", value=[cause_mappings()]),
                dash.DynamicConfigValue(
                    id_val="custom.cellOptions", value={"type": "color-background", "mode": "basic"}
                ),
            ],
        )
    )
    layout.panel(panel, w=16, h=9)
    layout.panel(
        state_timeline_panel(
            "Cause over time",
            "The triage rules' cause per partition: when it began, and what it was before.",
            [
                Query(
                    f"max by (projection, worker) (projectionist:partition_cause{{{_SEL}}})",
                    "{{projection}} {{worker}}",
                )
            ],
            rank_mappings(),
        ),
        w=8,
        h=9,
    )
