"""Shared pieces of the dashboards: data source uids, selectors, a grid cursor and panel factories.

The data source uids are the ones provisioned in
``compose/grafana/provisioning/datasources/datasources.yml``; the tests check
that every uid a dashboard names is one of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import prometheus, stat, statetimeline, table, timeseries
from grafana_foundation_sdk.builders.dashboard import (
    Dashboard,
    DatasourceVariable,
    QueryVariable,
    Row,
    ThresholdsConfig,
    TimePicker,
)
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog import variants as cogvariants
from grafana_foundation_sdk.models import dashboard as dash
from grafana_foundation_sdk.models.common import (
    BigValueColorMode,
    BigValueGraphMode,
    DataSourceRef,
    GraphThresholdsStyleMode,
    LegendDisplayMode,
    LegendPlacement,
    StackingMode,
    VisibilityMode,
)
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

#: Provisioned data source uids (fixed, so dashboards and links survive re-provisioning).
PROMETHEUS_UID = "prometheus"
TEMPO_UID = "tempo"
PROVISIONED_UIDS = (PROMETHEUS_UID, TEMPO_UID)

#: Panels query whatever the ``datasource`` variable selects; it defaults to the provisioned one.
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")

#: Every dashboard opens on the last hour and refreshes every 10 s.
TIME_FROM = "now-1h"
REFRESH = "10s"
REFRESH_INTERVALS = ["5s", "10s", "30s", "1m", "5m", "15m"]

GRID_WIDTH = 24


def datasource_variable() -> DatasourceVariable:
    return (
        DatasourceVariable("datasource")
        .label("Data source")
        .type("prometheus")
        .current(dash.VariableOption(selected=True, text="Prometheus", value=PROMETHEUS_UID))
    )


def query_variable(
    name: str, label: str, query: str, *, include_all: bool, description: str
) -> QueryVariable:
    """A label_values() variable; with ``include_all`` it is multi-select and "All" means ``.*``."""
    variable = (
        QueryVariable(name)
        .label(label)
        .description(description)
        .datasource(DATASOURCE)
        .query(query)
        .refresh(dash.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dash.VariableSort.NATURAL_ASC)
        .include_all(include_all)
        .multi(include_all)
    )
    if include_all:
        variable = variable.all_value(".*").current(
            dash.VariableOption(selected=True, text="All", value="$__all")
        )
    return variable


def new_dashboard(uid: str, title: str, description: str, tags: Sequence[str]) -> Dashboard:
    return (
        Dashboard(title)
        .uid(uid)
        .description(description)
        .tags(list(tags))
        .time(TIME_FROM, "now")
        .refresh(REFRESH)
        .timepicker(TimePicker().refresh_intervals(REFRESH_INTERVALS))
        .tooltip(dash.DashboardCursorSync.CROSSHAIR)
        .timezone("browser")
        .editable()
    )


@dataclass(frozen=True, slots=True)
class Query:
    """One PromQL target. ``legend`` uses Grafana's ``{{label}}`` syntax."""

    expr: str
    legend: str = ""
    instant: bool = False
    exemplar: bool = False
    #: One row per series, its labels as columns (for a table).
    table: bool = False


def _targets(queries: Sequence[Query]) -> list[cogbuilder.Builder[cogvariants.Dataquery]]:
    targets: list[cogbuilder.Builder[cogvariants.Dataquery]] = []
    for index, q in enumerate(queries):
        target = (
            prometheus.Dataquery()
            .datasource(DATASOURCE)
            .ref_id(chr(ord("A") + index))
            .expr(q.expr)
            .legend_format(q.legend or "__auto")
            .exemplar(q.exemplar)
        )
        target = target.instant() if q.instant else target.range()
        if q.table:
            target = target.format(PromQueryFormat.TABLE)
        targets.append(target)
    return targets


class Layout:
    """Places rows and panels on Grafana's 24-column grid, top to bottom, and numbers them.

    Each ``panel`` call takes a width; a panel that does not fit on the current
    line starts a new one below the tallest panel of that line.
    """

    def __init__(self, dashboard: Dashboard) -> None:
        self.dashboard = dashboard
        self._next_id = 1
        self._x = 0
        self._y = 0
        self._line_height = 0

    def _new_line(self) -> None:
        self._y += self._line_height
        self._x = 0
        self._line_height = 0

    def _take_id(self) -> int:
        panel_id = self._next_id
        self._next_id += 1
        return panel_id

    def row(self, title: str) -> None:
        if self._x:
            self._new_line()
        self.dashboard.with_row(
            Row(title)
            .id(self._take_id())
            .collapsed(False)
            .grid_pos(dash.GridPos(x=0, y=self._y, w=GRID_WIDTH, h=1))
        )
        self._y += 1

    def panel(
        self, builder: timeseries.Panel | stat.Panel | statetimeline.Panel | table.Panel, *, w: int, h: int
    ) -> None:
        if self._x + w > GRID_WIDTH:
            self._new_line()
        builder.id(self._take_id()).grid_pos(dash.GridPos(x=self._x, y=self._y, w=w, h=h))
        self.dashboard.with_panel(builder)
        self._x += w
        self._line_height = max(self._line_height, h)
        if self._x >= GRID_WIDTH:
            self._new_line()


def _thresholds(steps: Sequence[tuple[float | None, str]]) -> ThresholdsConfig:
    return (
        ThresholdsConfig()
        .mode(dash.ThresholdsMode.ABSOLUTE)
        .steps([dash.Threshold(value=value, color=color) for value, color in steps])
    )


def timeseries_panel(
    title: str,
    description: str,
    unit: str,
    queries: Sequence[Query],
    *,
    min_value: float | None = 0,
    thresholds: Sequence[tuple[float | None, str]] | None = None,
    stack: bool = False,
) -> timeseries.Panel:
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .unit(unit)
        .datasource(DATASOURCE)
        .targets(_targets(queries))
        .line_width(1)
        .fill_opacity(10)
        .show_points(VisibilityMode.NEVER)
        .legend(
            common_builders.VizLegendOptions()
            .display_mode(LegendDisplayMode.TABLE)
            .placement(LegendPlacement.BOTTOM)
            .show_legend(True)
            .calcs(["lastNotNull", "max"])
        )
    )
    if min_value is not None:
        panel = panel.min(min_value)
    if thresholds:
        panel = panel.thresholds(_thresholds(thresholds)).thresholds_style(
            common_builders.GraphThresholdsStyleConfig().mode(GraphThresholdsStyleMode.LINE)
        )
    if stack:
        panel = panel.stacking(common_builders.StackingConfig().mode(StackingMode.NORMAL))
    return panel


def stat_panel(
    title: str,
    description: str,
    unit: str,
    queries: Sequence[Query],
    *,
    thresholds: Sequence[tuple[float | None, str]] = ((None, "green"),),
    mappings: Sequence[dash.ValueMap] = (),
) -> stat.Panel:
    panel = (
        stat.Panel()
        .title(title)
        .description(description)
        .unit(unit)
        .datasource(DATASOURCE)
        .targets(_targets(queries))
        .graph_mode(BigValueGraphMode.AREA)
        .color_mode(BigValueColorMode.VALUE)
        .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .thresholds(_thresholds(thresholds))
    )
    if mappings:
        panel = panel.mappings(list(mappings))
    return panel


def state_timeline_panel(
    title: str, description: str, queries: Sequence[Query], mappings: dash.ValueMap
) -> statetimeline.Panel:
    return (
        statetimeline.Panel()
        .title(title)
        .description(description)
        .unit("none")
        .datasource(DATASOURCE)
        .targets(_targets(queries))
        .mappings([mappings])
        .show_value(VisibilityMode.AUTO)
        .merge_values(True)
        .row_height(0.8)
        .fill_opacity(80)
    )


def table_panel(
    title: str,
    description: str,
    queries: Sequence[Query],
    transformations: Sequence[dash.DataTransformerConfig],
) -> table.Panel:
    """A table of instant queries (``table=True``), merged and arranged by ``transformations``."""
    return (
        table.Panel()
        .title(title)
        .description(description)
        .unit("none")
        .datasource(DATASOURCE)
        .targets(_targets(queries))
        .transformations(list(transformations))
    )
