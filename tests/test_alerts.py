"""The shipped alert rules: valid for Prometheus, unit-tested with promtool, complete, linked to a runbook."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from dashboards import rules

from tests.helpers import ROOT

RULES_DIR = ROOT / "deploy" / "prometheus" / "rules"
RULES = RULES_DIR / "projectionist-alerts.yml"
RULE_TESTS = RULES_DIR / "projectionist-alerts.test.yml"

# The alerts an operator needs, by what they detect.
REQUIRED_ALERTS = {
    "ProjectionistWorkerDown",  # worker down
    "ProjectionistWorkersAbsent",  # worker absent
    "ProjectionistLagHigh",  # lag seconds above a threshold for 5 minutes
    "ProjectionistWorkerStalled",  # lag > 0 and no progress
    "ProjectionistPartitionUncovered",  # coverage below TOTAL_WORKERS
    "ProjectionistErrorsRising",  # errors rising
    "ProjectionistOldestTransactionTooOld",  # oldest open transaction too old
    "ProjectionistWorkerFailing",  # held in front of a poison event (POISON_POLICY=stop)
    "ProjectionistEventsParked",  # dead letters waiting (POISON_POLICY=park)
    "ProjectionistPartitionIndexMissing",  # reads step over other partitions' rows
}


def promtool(*args: str, cwd: Path = RULES_DIR) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    assert binary is not None, "promtool is missing: `apt-get install prometheus` (.ci/run does)"
    return subprocess.run([binary, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule]


def test_promtool_check_rules_accepts_the_rules() -> None:
    result = promtool("check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_promtool_check_rules_accepts_every_rule_file() -> None:
    files = rules.rule_files()
    assert RULES in files and RULE_TESTS not in files
    result = promtool("check", "rules", *(p.name for p in files))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(files)


def test_promtool_unit_tests_pass() -> None:
    result = promtool("test", "rules", RULE_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_required_alert_exists_and_tells_the_operator_what_to_do() -> None:
    rules = alert_rules()
    assert {r["alert"] for r in rules} == REQUIRED_ALERTS
    for rule in rules:
        annotations = rule.get("annotations", {})
        assert annotations.get("summary"), f"{rule['alert']} has no summary"
        description = annotations.get("description", "")
        # "What to do": every description names an action for the operator.
        assert len(description) > 120, f"{rule['alert']} description is too thin"
        assert any(
            verb in description for verb in ("Start", "start", "Check", "check", "Fix", "Find", "restart")
        ), f"{rule['alert']} description does not say what to do"
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule.get("for"), f"{rule['alert']} fires on a single evaluation"


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in tests:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert firing == REQUIRED_ALERTS, f"no firing case for {REQUIRED_ALERTS - firing}"
    assert quiet == REQUIRED_ALERTS, f"no quiet case for {REQUIRED_ALERTS - quiet}"


@pytest.mark.parametrize("mutation", ["> 60", "for: 5m"])
def test_unit_tests_catch_a_broken_rule(tmp_path: Path, mutation: str) -> None:
    """The unit tests are not vacuous: loosening one rule makes them fail."""
    broken = RULES.read_text()
    replacement = {"> 60": "> 6000", "for: 5m": "for: 50m"}[mutation]
    assert mutation in broken
    (tmp_path / RULES.name).write_text(broken.replace(mutation, replacement, 1))
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    result = promtool("test", "rules", RULE_TESTS.name, cwd=tmp_path)
    assert result.returncode != 0
    assert "FAILED" in result.stdout + result.stderr


def test_compose_prometheus_loads_the_rules_directory_cleanly(tmp_path: Path) -> None:
    """compose/prometheus.yml mounts this directory at rules/: every file it selects must be a rule file.

    A glob like ``rules/*.yml`` would also pick up the promtool test file,
    which Prometheus refuses to load, so the whole server would not start.
    """
    compose_config = ROOT / "compose" / "prometheus.yml"
    assert compose_config.exists()
    shutil.copy(compose_config, tmp_path / "prometheus.yml")
    (tmp_path / "rules").symlink_to(RULES_DIR, target_is_directory=True)
    result = promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert RULES.name in output, f"compose does not load {RULES.name}:\n{output}"


# -- runbook links -------------------------------------------------------------------------


def test_every_alert_links_to_its_section_of_the_alert_guide() -> None:
    """runbook_url is the guide's URL plus the alert's heading anchor (MkDocs: the name in lower case)."""
    assert rules.RUNBOOK_BASE_URL == "https://projectionist.readthedocs.io/en/latest/operate/alerts/"
    alerts = {rule["alert"] for _, rule in rules.rules() if "alert" in rule}
    assert alerts >= REQUIRED_ALERTS
    expected = {alert: f"{rules.RUNBOOK_BASE_URL}#{alert.lower()}" for alert in alerts}
    assert rules.runbook_urls() == expected
    assert rules.runbook_url("ProjectionistLagHigh") == (
        "https://projectionist.readthedocs.io/en/latest/operate/alerts/#projectionistlaghigh"
    )


def test_recording_rules_need_no_runbook(tmp_path: Path) -> None:
    (tmp_path / "recording.yml").write_text(
        "groups:\n  - name: r\n    rules:\n      - record: a:b:sum\n        expr: sum(up)\n"
    )
    assert rules.runbook_urls(tmp_path) == {}


def test_a_missing_or_conflicting_runbook_link_is_reported(tmp_path: Path) -> None:
    text = RULES.read_text()
    link = f"runbook_url: {rules.runbook_url('ProjectionistLagHigh')}"
    assert text.count(link) == 1
    (tmp_path / RULES.name).write_text(text.replace(link, "runbook_url: ''"))
    with pytest.raises(ValueError, match=r"ProjectionistLagHigh has no annotation runbook_url: https://"):
        rules.runbook_urls(tmp_path)
    (tmp_path / RULES.name).write_text(text)
    (tmp_path / "more.yml").write_text(
        "groups:\n  - name: more\n    rules:\n      - alert: ProjectionistLagHigh\n"
        "        expr: vector(1)\n        annotations:\n          runbook_url: https://example.invalid/\n"
    )
    with pytest.raises(ValueError, match="link to"):
        rules.runbook_urls(tmp_path)


def test_unit_tests_expect_the_runbook_links() -> None:
    """promtool compares every annotation, so each expected alert names its link."""
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    expected = [
        (check["alertname"], alert["exp_annotations"])
        for case in tests
        for check in case.get("alert_rule_test", [])
        for alert in check.get("exp_alerts", [])
        if "exp_annotations" in alert
    ]
    assert expected
    for alertname, expected_annotations in expected:
        assert expected_annotations["runbook_url"] == rules.runbook_url(alertname)
