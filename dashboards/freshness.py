"""The "Freshness" row: the objective, the error budget left, how fast it burns, and the delay percentiles.

Its queries read the recording rules of ``deploy/prometheus/rules/projectionist-slo.yml``
and the ``projectionist_apply_delay_seconds`` histogram.
"""

from __future__ import annotations

from dashboards.common import Layout, Query, stat_panel, timeseries_panel

_SEL = 'projection=~"$projection", worker=~"$worker"'
_PROJ = 'projection=~"$projection"'
_BUDGET = "(1 - scalar(projectionist:freshness_objective:ratio))"


def add_row(layout: Layout) -> None:
    layout.row("Freshness")
    layout.panel(
        stat_panel(
            "Freshness objective",
            "The share of events to apply within the threshold, over 30 days, and the threshold: the "
            "time from an event's append to the commit of the batch that applied it. Change both in "
            "deploy/prometheus/rules/projectionist-slo.yml.",
            "percentunit",
            [Query("projectionist:freshness_objective:ratio", "objective", instant=True)],
        ),
        w=3,
        h=8,
    )
    layout.panel(
        stat_panel(
            "Threshold",
            "An event applied later than this after its append counts against the error budget.",
            "s",
            [Query("projectionist:freshness_threshold:seconds", "threshold", instant=True)],
        ),
        w=3,
        h=8,
    )
    layout.panel(
        stat_panel(
            "Error budget remaining (30 days)",
            "1 - (share of events applied late over 30 days) / (1 - objective): 100% is the whole budget "
            "left, 0 is spent, below 0 the objective is missed. Over Prometheus' retention when it is "
            "shorter than 30 days.",
            "percentunit",
            [
                Query(
                    f"projectionist:freshness_budget_remaining:ratio30d{{{_PROJ}}}",
                    "{{projection}}",
                    instant=True,
                )
            ],
            thresholds=[(None, "red"), (0, "orange"), (0.25, "green")],
        ),
        w=6,
        h=8,
    )
    layout.panel(
        timeseries_panel(
            "Budget burn rate",
            "How many times faster than the objective allows events are applied late, over 5 minutes and "
            "over 1 hour. The fast-burn alert pages when both pass 14.4 (2% of the 30-day budget in an "
            "hour); at 1 the budget lasts exactly 30 days.",
            "none",
            [
                Query(
                    f"projectionist:freshness_errors:ratio_rate5m{{{_PROJ}}} / {_BUDGET}", "5m {{projection}}"
                ),
                Query(
                    f"projectionist:freshness_errors:ratio_rate1h{{{_PROJ}}} / {_BUDGET}", "1h {{projection}}"
                ),
            ],
            thresholds=[(None, "green"), (6, "orange"), (14.4, "red")],
        ),
        w=12,
        h=8,
    )
    layout.panel(
        timeseries_panel(
            "Append-to-apply delay",
            "Percentiles of the time from each event's append to the commit of the batch that applied "
            "it, both on the database's clock. The dots are exemplars: the batch whose events waited "
            "longest; click one to open its trace.",
            "s",
            [
                Query(
                    f"histogram_quantile({q}, sum by (le, projection) "
                    f"(rate(projectionist_apply_delay_seconds_bucket{{{_SEL}}}[$__rate_interval])))",
                    f"p{round(q * 100)} {{{{projection}}}}",
                    exemplar=True,
                )
                for q in (0.5, 0.9, 0.99)
            ],
        ),
        w=12,
        h=8,
    )
    layout.panel(
        timeseries_panel(
            "Events applied late",
            "The share of each projection's events applied later than the threshold, over 5 minutes, "
            "against the share the objective allows.",
            "percentunit",
            [
                Query(f"projectionist:freshness_errors:ratio_rate5m{{{_PROJ}}}", "late {{projection}}"),
                Query("1 - projectionist:freshness_objective:ratio", "allowed"),
            ],
        ),
        w=12,
        h=8,
    )
