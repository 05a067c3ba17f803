"""The freshness objective, the triage causes, the database alerts: promtool-tested, consistent, documented.

The rule files' own unit tests (``*.test.yml`` beside them) run here with
promtool; these tests also check that the unit tests can fail, that the
objective's threshold is one the histogram can answer, and that the causes
the rules name are the ones the dashboard maps and the docs explain.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from dashboards import rules
from dashboards.triage import CAUSES

from projectionist.telemetry.freshness import APPLY_DELAY_BUCKETS
from tests.helpers import ROOT

RULES_DIR = rules.RULES_DIR
SLO = RULES_DIR / "projectionist-slo.yml"
TRIAGE = RULES_DIR / "projectionist-triage.yml"
DATABASE = RULES_DIR / "projectionist-database.yml"
NEW_ALERTS = {
    "ProjectionistFreshnessBudgetBurnFast": SLO,
    "ProjectionistFreshnessBudgetBurnSlow": SLO,
    "ProjectionistDatabaseDown": DATABASE,
    "ProjectionistDatabaseConnectionsNearLimit": DATABASE,
}


def promtool(*args: str, cwd: Path = RULES_DIR) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    assert binary is not None, "promtool is missing: `apt-get install prometheus` (.ci/run does)"
    return subprocess.run([binary, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def unit_test_files() -> list[Path]:
    return sorted(RULES_DIR.glob("*.test.yml"))


def load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(path.read_text())
    return data


def test_every_rule_file_has_unit_tests_and_they_pass() -> None:
    files = unit_test_files()
    assert {p.name.replace(".test.yml", ".yml") for p in files} == {p.name for p in rules.rule_files()}
    result = promtool("test", "rules", *(p.name for p in files))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(files)


def test_every_new_alert_has_a_firing_and_a_quiet_case_and_links_its_runbook() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for path in {SLO, DATABASE}:
        for case in load(path.with_name(path.name.replace(".yml", ".test.yml")))["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
                for alert in check.get("exp_alerts", []):
                    assert alert["exp_annotations"]["runbook_url"] == rules.runbook_url(check["alertname"])
    assert firing == quiet == set(NEW_ALERTS)
    defined = {rule["alert"]: path for path, rule in rules.rules() if "alert" in rule}
    for alert, path in NEW_ALERTS.items():
        assert defined[alert] == path


_HOT = (
    "ratio > 0.5)\n      - record: projectionist:partition_signal\n"
    "        labels:\n          cause: hot_partition"
)


@pytest.mark.parametrize(
    ("path", "old", "new"),
    [
        # The fast burn rate loosened: the burst no longer pages.
        (SLO, "> 14.4 *", "> 144 *"),
        # The short window dropped: the page would not end with the burst.
        (
            SLO,
            "projectionist:freshness_errors:ratio_rate5m > 14.4",
            "projectionist:freshness_errors:ratio_rate1h > 14.4",
        ),
        # Precedence: a failing event must win over an unowned partition's lag, and so on.
        (TRIAGE, 'cause="failing_event"} * 8', 'cause="failing_event"} * 0.5'),
        (
            TRIAGE,
            'or on (projection, worker, total_workers) projectionist:partition_signal{cause="ok"} * 0',
            "",
        ),
        # Hot and under-provisioned are told apart by the share of busy partitions.
        (TRIAGE, _HOT, _HOT.replace("> 0.5", "> 0")),
        (DATABASE, "> 0.9", "> 0.99"),
    ],
)
def test_unit_tests_catch_a_broken_rule(tmp_path: Path, path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, old
    for source in RULES_DIR.glob("*.yml"):
        shutil.copy(source, tmp_path / source.name)
    (tmp_path / path.name).write_text(text.replace(old, new, 1))
    test_file = path.name.replace(".yml", ".test.yml")
    result = promtool("test", "rules", test_file, cwd=tmp_path)
    assert result.returncode != 0, result.stdout
    assert "FAILED" in result.stdout + result.stderr


def _records(path: Path) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for group in load(path)["groups"]:
        for rule in group["rules"]:
            if "record" in rule:
                out.setdefault(rule["record"], []).append(rule)
    return out


def test_the_objectives_threshold_is_a_bucket_bound_and_the_same_everywhere() -> None:
    records = _records(SLO)
    (threshold,) = records["projectionist:freshness_threshold:seconds"]
    seconds = float(re.fullmatch(r"vector\(([0-9.]+)\)", threshold["expr"].strip()).group(1))  # type: ignore[union-attr]
    assert seconds in APPLY_DELAY_BUCKETS, "the histogram has no bucket at the threshold"
    error_rules = [name for name in records if name.startswith("projectionist:freshness_errors:ratio_rate")]
    assert {n.rsplit("rate", 1)[1] for n in error_rules} == {"5m", "30m", "1h", "6h", "3d", "30d"}
    for name in error_rules:
        (rule,) = records[name]
        window = name.rsplit("rate", 1)[1]
        assert re.findall(r'le="([^"]+)"', rule["expr"]) == [repr(seconds)], name
        assert re.findall(r"\[(\w+)\]", rule["expr"]) == [window, window], name
    (objective,) = records["projectionist:freshness_objective:ratio"]
    assert objective["expr"].strip() == "vector(0.99)"


def test_the_causes_are_the_dashboards_and_the_docs() -> None:
    records = _records(TRIAGE)
    signals = [rule["labels"]["cause"] for rule in records["projectionist:partition_signal"]]
    assert signals == [c.name for c in CAUSES], "one signal per cause, in the order of precedence"
    (cause,) = records["projectionist:partition_cause"]
    ranks = re.findall(r'cause="(\w+)"\} \* (\d+)', cause["expr"])
    assert [(name, int(rank)) for name, rank in ranks] == [(c.name, c.rank) for c in CAUSES]
    header = TRIAGE.read_text().split("groups:")[0]
    for c in CAUSES:
        assert re.search(rf"#\s+{c.rank} {c.name}\b", header), f"{c.name} is not listed in the file's header"
    doc = (ROOT / "docs" / "operate" / "triage.md").read_text()
    assert re.findall(r"^### `(\w+)`", doc, re.M) == [c.name for c in CAUSES]
