"""The Prometheus rule files in ``deploy/prometheus/rules/`` and the runbook link of every alert.

Each alert carries a ``runbook_url`` annotation that points to its section of
the alert guide (``docs/operate/alerts.md``, one heading per alert);
``RUNBOOK_BASE_URL`` is the one place that says where that guide is published.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
#: The rule files: compose mounts this folder into Prometheus, and the
#: PrometheusRule manifests are generated from it.
RULES_DIR = ROOT / "deploy" / "prometheus" / "rules"

#: The published alert guide. An alert's link is this URL plus ``#`` and the
#: alert name in lower case, the anchor MkDocs gives the heading ``## <AlertName>``.
RUNBOOK_BASE_URL = "https://projectionist.readthedocs.io/en/latest/operate/alerts/"

#: promtool's unit-test files live beside the rules; Prometheus refuses to load them as rules.
TEST_FILE_SUFFIXES = (".test.yml", ".test.yaml")


def runbook_url(alert: str) -> str:
    """The link an alert named ``alert`` must carry in its ``runbook_url`` annotation."""
    return f"{RUNBOOK_BASE_URL}#{alert.lower()}"


def rule_files(rules_dir: Path = RULES_DIR) -> list[Path]:
    """Every rule file in ``rules_dir`` (``*.yml`` and ``*.yaml``, not promtool's ``*.test.yml``), by name."""
    paths = [*rules_dir.glob("*.yml"), *rules_dir.glob("*.yaml")]
    return sorted(p for p in paths if not p.name.endswith(TEST_FILE_SUFFIXES))


def load_rule_file(path: Path) -> dict[str, Any]:
    """A rule file's content: a mapping whose only key is ``groups``, each group with ``name`` and ``rules``.

    Raises ``ValueError`` naming the file for anything else, so that a stray
    file in the rules folder fails loudly instead of being published as rules.
    """
    doc = yaml.safe_load(path.read_text())
    if not isinstance(doc, dict) or set(doc) != {"groups"} or not isinstance(doc["groups"], list):
        raise ValueError(f"{path.name}: a rule file holds exactly one top-level key, groups (a list)")
    for group in doc["groups"]:
        if not isinstance(group, dict) or not group.get("name") or not isinstance(group.get("rules"), list):
            raise ValueError(f"{path.name}: every group needs a name and a list of rules: {group!r}")
    return doc


def rules(rules_dir: Path = RULES_DIR) -> list[tuple[Path, dict[str, Any]]]:
    """Every rule (alerting and recording) of every rule file, with the file it comes from."""
    return [
        (path, rule)
        for path in rule_files(rules_dir)
        for group in load_rule_file(path)["groups"]
        for rule in group["rules"]
    ]


def runbook_urls(rules_dir: Path = RULES_DIR) -> dict[str, str]:
    """``{alert name: its runbook_url annotation}`` for every alert in the rule files.

    Raises ``ValueError`` if an alert has no ``runbook_url``, or if two rules of
    the same alert name (a warning and a critical one, say) link to different places.
    """
    urls: dict[str, str] = {}
    for path, rule in rules(rules_dir):
        alert = rule.get("alert")
        if alert is None:
            continue
        url = (rule.get("annotations") or {}).get("runbook_url")
        if not url:
            raise ValueError(
                f"{path.name}: alert {alert} has no annotation runbook_url: {runbook_url(alert)}"
            )
        if urls.setdefault(alert, url) != url:
            raise ValueError(f"{path.name}: the rules named {alert} link to {urls[alert]} and {url}")
    return urls
