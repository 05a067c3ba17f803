"""deploy/kubernetes/monitoring: the alert rules as PrometheusRules, the dashboards as a sidecar ConfigMap.

Both files are generated (``make dashboards``) from the one rules folder and
the dashboards code; these tests regenerate them in memory and compare, and
check that what they hold is what kube-prometheus-stack loads.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from dashboards import generate, manifests, rules

from tests import crds, kustomize
from tests.helpers import ROOT

MONITORING = ROOT / "deploy" / "kubernetes" / "monitoring"
STALE = "is out of date: run `make dashboards`"
# kubectl apply (client-side) keeps a copy of the object in an annotation, which
# Kubernetes caps at 256 KiB; a ConfigMap itself is capped at 1 MiB.
APPLY_ANNOTATION_LIMIT = 256 * 1024


def committed(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((MONITORING / name).read_text()) if doc]


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    assert binary is not None, "promtool is missing: `apt-get install prometheus` (.ci/run does)"
    return subprocess.run([binary, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


# -- generated, and up to date ----------------------------------------------------------


@pytest.mark.parametrize("name", sorted(manifests.render_manifests()))
def test_committed_manifest_is_what_the_code_generates(name: str) -> None:
    path = MONITORING / name
    assert path.exists(), f"{path.relative_to(ROOT)} is missing: run `make dashboards`"
    assert path.read_text() == manifests.render_manifests()[name], f"{path.relative_to(ROOT)} {STALE}"


def test_check_mode_reports_a_stale_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert manifests.main(["--output-dir", str(tmp_path)]) == 0
    assert manifests.main(["--check", "--output-dir", str(tmp_path)]) == 0
    victim = tmp_path / manifests.PROMETHEUS_RULE_FILE
    victim.write_text(victim.read_text().replace("for: 5m", "for: 50m", 1))
    assert manifests.main(["--check", "--output-dir", str(tmp_path)]) == 1
    assert STALE in capsys.readouterr().err


def test_make_dashboards_regenerates_the_manifests() -> None:
    target = re.search(r"^dashboards:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.M)
    assert target, "no dashboards target in the Makefile"
    assert "-m dashboards.manifests" in target.group(1)


# -- the PrometheusRule ------------------------------------------------------------------


def test_one_prometheus_rule_per_rule_file_holding_exactly_its_rules() -> None:
    objects = committed(manifests.PROMETHEUS_RULE_FILE)
    files = rules.rule_files()
    assert files, "no rule files found"
    assert [o["metadata"]["name"] for o in objects] == [p.stem for p in files]
    for obj, path in zip(objects, files, strict=True):
        assert obj["apiVersion"] == "monitoring.coreos.com/v1" and obj["kind"] == "PrometheusRule"
        assert obj["spec"] == rules.load_rule_file(path)
        assert crds.problems(obj) == []


def test_promtool_accepts_the_prometheus_rule_spec(tmp_path: Path) -> None:
    """What the Operator hands Prometheus: each object's spec, as a rule file."""
    for obj in committed(manifests.PROMETHEUS_RULE_FILE):
        path = tmp_path / f"{obj['metadata']['name']}.yml"
        path.write_text(yaml.safe_dump(obj["spec"]))
        result = promtool("check", "rules", path.name, cwd=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr


def test_the_header_explains_the_release_label() -> None:
    text = (MONITORING / manifests.PROMETHEUS_RULE_FILE).read_text()
    assert "release" in text and "ruleSelectorNilUsesHelmValues" in text
    assert "make dashboards" in text.splitlines()[0]


def test_several_rule_files_become_several_prometheus_rules(tmp_path: Path) -> None:
    shutil.copy(rules.RULES_DIR / "projectionist-alerts.yml", tmp_path)
    shutil.copy(rules.RULES_DIR / "projectionist-alerts.test.yml", tmp_path)  # not a rule file
    recording = {
        "groups": [
            {
                "name": "projectionist-recording",
                "rules": [
                    {
                        "record": "projection:projectionist_lag_seconds:max",
                        "expr": "max by (projection) (projectionist_lag_seconds)",
                    }
                ],
            }
        ]
    }
    (tmp_path / "projectionist-recording.yaml").write_text(
        "# Recording rules.\n" + yaml.safe_dump(recording, sort_keys=False)
    )
    objects = [d for d in yaml.safe_load_all(manifests.prometheus_rules(tmp_path)) if d]
    assert [o["metadata"]["name"] for o in objects] == ["projectionist-alerts", "projectionist-recording"]
    assert objects[1]["spec"] == recording
    assert [p for o in objects for p in crds.problems(o)] == []
    # The alerts keep their runbook links; the recording rule needs none.
    alerts = {
        r["alert"] for path, r in rules.rules() if "alert" in r and path.name == "projectionist-alerts.yml"
    }
    assert set(rules.runbook_urls(tmp_path)) == alerts


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("extra.yml", "groups: []\nrule_files: [x]\n", "exactly one top-level key"),
        ("nameless.yml", "groups:\n  - rules: []\n", "needs a name"),
        ("Bad_Name.yml", "groups:\n  - name: g\n    rules: []\n", "Kubernetes name"),
    ],
)
def test_a_file_that_is_not_a_rule_file_is_refused(
    tmp_path: Path, name: str, text: str, message: str
) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=message):
        manifests.prometheus_rules(tmp_path)


def test_structural_check_catches_a_broken_rule() -> None:
    obj = committed(manifests.PROMETHEUS_RULE_FILE)[0]
    rule = obj["spec"]["groups"][0]["rules"][0]
    rule["for"] = "5 minutes"
    rule["record"] = "x"
    rule["severity"] = "critical"
    found = crds.problems(obj)
    assert any("not a duration" in p for p in found)
    assert any("exactly one of alert and record" in p for p in found)
    assert any("unknown fields ['severity']" in p for p in found)


# -- the dashboards ConfigMap ----------------------------------------------------------------


@pytest.fixture(scope="module")
def configmap() -> dict[str, Any]:
    (obj,) = committed(manifests.DASHBOARDS_CONFIGMAP_FILE)
    return obj


def test_configmap_carries_the_sidecar_label(configmap: dict[str, Any]) -> None:
    # kube-prometheus-stack: grafana.sidecar.dashboards.label / labelValue (a string).
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"


def test_configmap_holds_every_dashboard_as_provisioned_for_compose(configmap: dict[str, Any]) -> None:
    assert set(configmap["data"]) == set(generate.DASHBOARDS)
    for name, text in configmap["data"].items():
        assert name.endswith(".json"), "the sidecar writes each key as a file Grafana loads"
        assert text == (generate.OUTPUT_DIR / name).read_text(), f"{name} differs from compose's copy"
        assert json.loads(text)["uid"]


def test_configmap_fits_a_client_side_apply(configmap: dict[str, Any]) -> None:
    size = len((MONITORING / manifests.DASHBOARDS_CONFIGMAP_FILE).read_bytes())
    assert size < APPLY_ANNOTATION_LIMIT, (
        f"{size} bytes: too big for `kubectl apply` without --server-side; split the ConfigMap"
    )


def test_dashboard_json_reads_as_block_text() -> None:
    text = (MONITORING / manifests.DASHBOARDS_CONFIGMAP_FILE).read_text()
    assert re.search(r"^  projection-workers\.json: \|$", text, re.M), "JSON as a literal block, diffable"


# -- the kustomization and the README ----------------------------------------------------


def test_uncommenting_the_release_label_labels_every_object(tmp_path: Path) -> None:
    """The step the README and the PrometheusRule's header describe works as written."""
    for path in MONITORING.glob("*.yaml"):
        shutil.copy(path, tmp_path)
    source = (MONITORING / "kustomization.yaml").read_text()
    commented = re.search(
        r"^  # - pairs:\n  #     release: .*\n  #   includeSelectors: false\n", source, re.M
    )
    assert commented, "kustomization.yaml no longer has the commented release label"
    enabled = source.replace(commented.group(0), commented.group(0).replace("  # ", "  "))
    (tmp_path / "kustomization.yaml").write_text(enabled)
    objects = kustomize.render(tmp_path)
    assert {o["kind"] for o in objects} == {"PrometheusRule", "ConfigMap"}
    for obj in objects:
        assert obj["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    real = kustomize.real_kustomize()
    if real is not None:
        assert sorted(kustomize.render_with(real, tmp_path), key=str) == sorted(objects, key=str)


def test_readme_tells_how_to_install() -> None:
    text = (MONITORING / "README.md").read_text()
    for needed in (
        "kubectl apply -k deploy/kubernetes/monitoring",
        "podmonitor.yaml",
        "release",
        "grafana_dashboard",
        "Import",
        "make dashboards",
    ):
        assert needed in text, f"README.md does not mention {needed}"
    # User-facing text: no development history.
    assert not re.search(r"\b(issue|PR) ?#?\d+|\bMISS\b|\b20\d\d-\d\d-\d\d\b", text)
    for link in re.findall(r"\]\(([^)#]+)\)", text):
        if not link.startswith("http"):
            assert (MONITORING / link).resolve().exists(), f"README.md links to missing {link}"
