"""The triage table, the freshness row and the PostgreSQL row of the "Projection workers" dashboard.

Every one of their expressions also runs against a real Prometheus in
tests/test_dashboards.py; these tests pin what each row must show.
"""

from __future__ import annotations

import json
from typing import Any

from dashboards.triage import CAUSES, COLUMNS

from tests.helpers import ROOT

DASHBOARD = ROOT / "compose" / "grafana" / "dashboards" / "projection-workers.json"


def rows() -> dict[str, list[dict[str, Any]]]:
    """Panels by the row above them, in order."""
    out: dict[str, list[dict[str, Any]]] = {}
    current = ""
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        if panel["type"] == "row":
            current = panel["title"]
            out[current] = []
        else:
            out[current].append(panel)
    return out


def exprs(panels: list[dict[str, Any]]) -> str:
    return "\n".join(t["expr"] for p in panels for t in p.get("targets", []))


def test_the_triage_table_is_at_the_top_and_shows_every_column() -> None:
    dashboard_rows = rows()
    assert next(iter(dashboard_rows)) == "Triage"
    table, timeline = dashboard_rows["Triage"]
    assert table["type"] == "table" and table["gridPos"]["y"] == 1
    assert all(t["format"] == "table" and t["instant"] for t in table["targets"])
    organize = next(t for t in table["transformations"] if t["id"] == "organize")["options"]
    assert organize["renameByName"] == COLUMNS
    assert {"lag (s)", "state", "owner", "cause"} <= set(COLUMNS.values())
    (cause_query,) = [t["expr"] for t in table["targets"] if "projectionist:partition_cause" in t["expr"]]
    assert "$projection" in cause_query and "$worker" in cause_query
    # Worst first: sorted by the cause's rank, which the table does not show.
    assert table["transformations"][1] == {
        "id": "sortBy",
        "options": {"sort": [{"desc": True, "field": "Value #E"}]},
    }
    (cause_override,) = [o for o in table["fieldConfig"]["overrides"] if o["matcher"]["options"] == "cause"]
    mapping = cause_override["properties"][0]["value"][0]["options"]
    assert set(mapping) == {c.name for c in CAUSES}
    assert timeline["type"] == "state-timeline"
    ranks = timeline["fieldConfig"]["defaults"]["mappings"][0]["options"]
    assert {int(rank): m["text"] for rank, m in ranks.items()} == {c.rank: c.text for c in CAUSES}


def test_the_freshness_row_shows_the_objective_the_budget_and_the_delays() -> None:
    panels = rows()["Freshness"]
    titles = [p["title"] for p in panels]
    assert titles[:3] == ["Freshness objective", "Threshold", "Error budget remaining (30 days)"]
    text = exprs(panels)
    for series in (
        "projectionist:freshness_objective:ratio",
        "projectionist:freshness_budget_remaining:ratio30d",
        "projectionist:freshness_errors:ratio_rate5m",
        "projectionist:freshness_errors:ratio_rate1h",
        "projectionist_apply_delay_seconds_bucket",
    ):
        assert series in text, series
    (delay,) = [p for p in panels if p["title"] == "Append-to-apply delay"]
    assert all(t["exemplar"] for t in delay["targets"]) and len(delay["targets"]) == 3


def test_the_postgresql_row_reads_the_exporters_standard_series() -> None:
    panels = rows()["PostgreSQL"]
    text = exprs(panels)
    for series in (
        "pg_up",
        "pg_stat_activity_count",
        "pg_settings_max_connections",
        "pg_stat_database_xact_commit",
        "pg_stat_database_xact_rollback",
        "pg_locks_count",
        "pg_stat_database_deadlocks",
        "pg_stat_activity_max_tx_duration",
        "pg_stat_checkpointer_num_requested_total",
        "pg_stat_database_blks_hit",
    ):
        assert series in text, series
    # Only the lock waits come from the shipped custom queries.
    queries = (ROOT / "deploy" / "postgres-exporter" / "queries.yaml").read_text()
    assert "pg_locks_waiting:" in queries and "pg_locks_waiting_count" in text
