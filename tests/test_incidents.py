"""The incident lab: its quick subset end to end (what CI runs), and its parts on their own.

The quick subset stages the control (steady load), a killed worker and a
database restart against the lab's own fleet, API, postgres_exporter and
Prometheus (see incidents/); a failure prints every check and the workers'
logs. ``make incidents`` runs every incident with the full timings.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from chaos.checks import Fold
from chaos.report import Check
from dashboards.rules import load_rule_file
from incidents import QUICK, Lab, render_table, run_incident, select
from incidents.catalog import INCIDENTS, expected_alerts
from incidents.render import FIRST_PANELS, dashboard_panels, legend, substitute
from incidents.report import IncidentResult
from incidents.scaling import duration, scale_rule_file, seconds, write_scaled_rules

# -- the quick subset, end to end ---------------------------------------------------------


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab() as running:
        yield running


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("slug", [i.slug for i in select(None, quick=True)])
def test_the_quick_incidents_name_their_cause_and_resolve(lab: Lab, slug: str, tmp_path: Path) -> None:
    (incident,) = select([slug], quick=True)
    result = run_incident(lab, incident, QUICK, tmp_path / "logs", tmp_path / "incidents")
    assert result.ok, result.explain()
    assert result.fold is not None and result.fold.events > 1000, "the load must have run"
    assert result.resolved_after is not None
    png = Path(result.png)
    assert png == tmp_path / "incidents" / f"{slug}.png" and png.stat().st_size > 20_000


def test_the_quick_subset_is_the_control_a_killed_worker_and_a_database_restart() -> None:
    assert [i.slug for i in select(None, quick=True)] == ["steady-load", "worker-killed", "database-restart"]
    assert len(select(None, quick=False)) == 10


# -- the parts ----------------------------------------------------------------------------


def test_every_incident_names_a_known_cause_and_draws_existing_panels() -> None:
    from dashboards.triage import BY_NAME

    panels = dashboard_panels()
    for incident in INCIDENTS:
        assert incident.cause in BY_NAME, incident.slug
        assert set(incident.also_causes) <= set(BY_NAME)
        for title in (*FIRST_PANELS, *incident.panels):
            assert title in panels, f"{incident.slug}: no panel {title!r}"
    causes = [i.cause for i in INCIDENTS]
    assert len(set(causes)) == len(causes), "one incident per cause"


def test_alerts_the_incidents_expect_or_allow_exist() -> None:
    from dashboards.rules import runbook_urls

    alerts = set(runbook_urls())
    for incident in INCIDENTS:
        assert {e.name for e in incident.required} <= alerts
        assert set(incident.allowed) <= alerts


def test_expected_alerts_take_the_victims_labels() -> None:
    incident = next(i for i in INCIDENTS if i.slug == "worker-killed")
    fault = incident.make_fault()
    fault.victim, fault.facts["instance"] = 2, "127.0.0.1:9"
    labels = [labels for _, labels in expected_alerts(incident, fault)]
    assert labels == [
        {"instance": "127.0.0.1:9"},
        {"projection": "recorder", "total_workers": "4", "worker": "2"},
    ]
    each = next(i for i in INCIDENTS if i.slug == "open-transaction")
    workers = [
        labels.get("worker") for e, labels in expected_alerts(each, each.make_fault()) if e.each_partition
    ]
    assert workers == ["0", "1", "2", "3"]


def test_durations_parse_and_format() -> None:
    assert seconds("1h30m") == 5400 and seconds("15s") == 15 and seconds("3d") == 259200
    assert duration(3.0) == "3s" and duration(0.25) == "250ms"
    for bad in ("", "5", "1x", "m5"):
        with pytest.raises(ValueError, match="not a Prometheus duration"):
            seconds(bad)


def test_scaling_divides_for_intervals_and_the_alerts_windows(tmp_path: Path) -> None:
    doc = {
        "groups": [
            {
                "name": "g",
                "interval": "1m",
                "rules": [
                    {"alert": "A", "expr": "rate(x[5m]) > 0", "for": "5m"},
                    {"record": "r", "expr": "rate(x[1h])"},
                ],
            }
        ]
    }
    plain = scale_rule_file(doc, 20, windows=False)
    assert plain["groups"][0]["interval"] == "3s"
    assert plain["groups"][0]["rules"][0] == {"alert": "A", "expr": "rate(x[5m]) > 0", "for": "15s"}
    windowed = scale_rule_file(doc, 20, windows=True)
    assert [r["expr"] for r in windowed["groups"][0]["rules"]] == ["rate(x[15s]) > 0", "rate(x[180s])"]
    assert doc["groups"][0]["rules"][0]["for"] == "5m", "the shipped content is not changed"
    written = {p.name: p for p in write_scaled_rules(tmp_path, 20)}
    slo = load_rule_file(written["projectionist-slo.yml"])
    burn = next(r for g in slo["groups"] for r in g["rules"] if r.get("alert") and r["for"] == "6s")
    assert burn["labels"]["long"] == "1h"  # the labels keep the shipped windows' names
    ratio = next(
        r
        for g in slo["groups"]
        for r in g["rules"]
        if r.get("record") == "projectionist:freshness_errors:ratio_rate5m"
    )
    assert "[15s]" in ratio["expr"]
    triage = yaml.safe_load(written["projectionist-triage.yml"].read_text())
    assert "[1m]" in str(triage), "the triage rules' windows stay as shipped"
    alerts = written["projectionist-alerts.yml"].read_text()
    assert "[15s]" in alerts and "[5m]" not in alerts
    assert shutil.which("promtool") is None or _promtool_accepts(list(written.values()))


def _promtool_accepts(paths: list[Path]) -> bool:
    import subprocess

    result = subprocess.run(
        ["promtool", "check", "rules", *map(str, paths)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return True


def test_panel_queries_take_every_partition_and_legends_fill_in() -> None:
    assert substitute('rate(x{projection=~"$projection", worker=~"${worker}"}[$__rate_interval])') == (
        'rate(x{projection=~".*", worker=~".*"}[12s])'
    )
    assert legend("{{projection}} worker {{worker}}", {"projection": "p", "worker": "1"}, "x") == "p worker 1"
    assert legend("__auto", {"b": "2", "a": "1"}, "x") == "a=1, b=2"


def test_the_table_has_the_columns_the_issue_asks_for() -> None:
    passed = IncidentResult(
        "worker-killed",
        "a worker is killed",
        "no_owner",
        named_after=2.4,
        fired=["ProjectionistWorkerDown (4 s)"],
        resolved_after=13.0,
        fold=Fold(events=5000, lost=0, duplicated=0, misordered=0, wrong_worker=0),
        checks=[Check("names it", True)],
        png="out/x.png",
    )
    failed = IncidentResult(
        "slow-apply", "slow apply", "slow_apply", false_alerts=["ProjectionistLagHigh 1/4 (70 s)"]
    )
    lines = render_table([passed, failed], pngs="incidents/").splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == [
        "incident",
        "expected cause",
        "cause named",
        "alerts fired (s after the fault)",
        "false alerts",
        "resolved after",
        "lost / duplicated",
        "result",
    ]
    assert (
        "| `no_owner` | yes, after 2 s | ProjectionistWorkerDown (4 s) | none | 13 s | 0 / 0 | PASS |"
        in lines[2]
    )
    assert lines[3].endswith("| no | none | ProjectionistLagHigh 1/4 (70 s) | - | - | FAIL |")
    assert passed.ok and not failed.ok
