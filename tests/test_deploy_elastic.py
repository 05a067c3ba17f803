"""deploy/kubernetes/elastic: the Deployment of elastic workers, KEDA's ScaledObject, and the HPA alternative.

The schemas are test_deploy.py's (every manifest and kustomization, KEDA's
kinds through tests/keda_crds.py). These tests pin what makes the pieces fit:
the workers run --elastic with no WORKER_ID and no replica count of their
own, the partition count agrees everywhere and bounds the replicas, the
autoscalers' queries run against a real database and their metric names are
ones projectionist exports, and the scale-down does not flap.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from projectionist.consume.checkpoints import register_group
from projectionist.settings import Settings, WorkerMode
from projectionist.store.connection import Connection
from projectionist.telemetry.metrics import MetricsHooks
from projectionist.telemetry.store_collector import StoreCollector
from tests import keda_crds, kustomize
from tests.helpers import ROOT
from tests.test_deploy import KUBERNETES_VERSIONS, env_of, schema_problems

ELASTIC = ROOT / "deploy" / "kubernetes" / "elastic"


def _objects(directory: Path) -> dict[tuple[str, str], dict[str, Any]]:
    return {(o["kind"], o["metadata"]["name"]): o for o in kustomize.render(directory)}


@pytest.fixture(scope="module")
def keda() -> dict[tuple[str, str], dict[str, Any]]:
    return _objects(ELASTIC)


@pytest.fixture(scope="module")
def hpa() -> dict[tuple[str, str], dict[str, Any]]:
    return _objects(ELASTIC / "hpa-prometheus")


def _one(objects: dict[tuple[str, str], dict[str, Any]], kind: str) -> dict[str, Any]:
    (obj,) = [o for (k, _), o in objects.items() if k == kind]
    return obj


def _worker(objects: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    (container,) = _one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def _partitions(objects: dict[tuple[str, str], dict[str, Any]]) -> int:
    return int(env_of(_worker(objects))["PARTITIONS"]["value"])


def test_elastic_workers_are_a_deployment_with_no_worker_id_and_no_replica_count(
    keda: dict[tuple[str, str], dict[str, Any]],
) -> None:
    deployment = _one(keda, "Deployment")
    assert "replicas" not in deployment["spec"], "the autoscaler owns it; kubectl apply would reset it"
    worker = _worker(keda)
    assert worker["command"] == ["projectionist", "worker", "--elastic"]
    env = env_of(worker)
    assert "WORKER_ID" not in env and "TOTAL_WORKERS" not in env
    settings = Settings.from_env({"PARTITIONS": env["PARTITIONS"]["value"]}, worker_mode=WorkerMode.ELASTIC)
    assert (settings.worker_mode, settings.worker_id, settings.partitions) == (WorkerMode.ELASTIC, None, 16)
    # A rolling update adds a member before one leaves: partitions move once, to the new pod.
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    assert worker["readinessProbe"]["httpGet"]["path"] == "/readyz"
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert _one(keda, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_the_migrate_job_is_the_static_one_with_the_elastic_partition_count(
    keda: dict[tuple[str, str], dict[str, Any]],
) -> None:
    static = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "migrate-job.yaml").read_text())
    elastic = copy.deepcopy(_one(keda, "Job"))
    (container,) = elastic["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["projectionist", "migrate", "--partitions", str(_partitions(keda))]
    # Apart from its name, partition count and kustomize's label, the same Job: they cannot drift apart.
    container["command"] = static["spec"]["template"]["spec"]["containers"][0]["command"]
    elastic["metadata"]["name"] = static["metadata"]["name"]
    del elastic["metadata"]["labels"]["app.kubernetes.io/part-of"]
    assert elastic == static


def test_the_scaled_object_scales_the_workers_on_the_sql_lag_within_the_partitions(
    keda: dict[tuple[str, str], dict[str, Any]],
) -> None:
    scaled = _one(keda, "ScaledObject")["spec"]
    assert scaled["scaleTargetRef"]["name"] == _one(keda, "Deployment")["metadata"]["name"]
    assert 0 <= scaled["minReplicaCount"] < scaled["maxReplicaCount"] <= _partitions(keda)
    triggers = {t["name"]: t for t in scaled["triggers"]}
    assert set(triggers) == {"lag", "busy"}
    assert all(
        t["type"] == "postgresql" and "projectionist_lag(" in t["metadata"]["query"]
        for t in triggers.values()
    )
    lag, busy = triggers["lag"], triggers["busy"]
    assert lag["metricType"] == "Value" and busy["metricType"] == "AverageValue"
    # With minReplicaCount 0, the lag wakes the workers up (activation) before it reaches its target.
    assert (
        0 < float(lag["metadata"]["activationTargetQueryValue"]) < float(lag["metadata"]["targetQueryValue"])
    )
    auth = {t["authenticationRef"]["name"] for t in triggers.values()}
    assert auth == {_one(keda, "TriggerAuthentication")["metadata"]["name"]}
    (ref,) = _one(keda, "TriggerAuthentication")["spec"]["secretTargetRef"]
    assert ref["parameter"] in keda_crds.POSTGRESQL_AUTH_PARAMETERS


def _no_flapping(behavior: dict[str, Any]) -> None:
    down, up = behavior["scaleDown"], behavior["scaleUp"]
    # Down: only to the highest count asked for over 5 minutes, one pod a minute at most.
    assert down["stabilizationWindowSeconds"] >= 300
    assert down["selectPolicy"] == "Min"
    assert all(p["type"] == "Pods" and p["value"] == 1 and p["periodSeconds"] >= 60 for p in down["policies"])
    # Up: at once.
    assert up["stabilizationWindowSeconds"] < down["stabilizationWindowSeconds"]


def test_both_autoscalers_scale_down_slowly_and_up_at_once(
    keda: dict[tuple[str, str], dict[str, Any]], hpa: dict[tuple[str, str], dict[str, Any]]
) -> None:
    _no_flapping(_one(keda, "ScaledObject")["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"])
    _no_flapping(_one(hpa, "HorizontalPodAutoscaler")["spec"]["behavior"])


def test_the_hpa_alternative_asks_for_the_metrics_the_adapter_serves(
    hpa: dict[tuple[str, str], dict[str, Any]],
) -> None:
    spec = _one(hpa, "HorizontalPodAutoscaler")["spec"]
    assert spec["scaleTargetRef"]["name"] == _one(hpa, "Deployment")["metadata"]["name"]
    assert 1 <= spec["minReplicas"] < spec["maxReplicas"] <= _partitions(hpa)
    rules = yaml.safe_load(_one(hpa, "ConfigMap")["data"]["config.yaml"])["externalRules"]
    served = {r["name"]["as"]: r for r in rules}
    asked = {m["external"]["metric"]["name"] for m in spec["metrics"]}
    assert asked == set(served)
    # Every series the adapter reads is one projectionist exports.
    registry = CollectorRegistry()
    MetricsHooks(registry, version="test")
    store = StoreCollector(_NoPool(), ["p"])  # type: ignore[arg-type]
    families = [*registry.collect(), *store.describe()]
    exported = {s for family in families for s in (family.name, f"{family.name}_sum")}
    for rule in rules:
        series = re.match(r"^(\w+)\{", rule["seriesQuery"])
        assert series is not None and series[1] in exported, rule["seriesQuery"]


class _NoPool:
    """Stands for the metrics pool: describing the lag collector's metrics reads only its stats."""

    def get_stats(self) -> dict[str, int]:
        return {}


def test_the_adapters_queries_are_valid_promql(
    hpa: dict[tuple[str, str], dict[str, Any]], tmp_path: Path
) -> None:
    binary = shutil.which("promtool")
    assert binary is not None, "promtool is missing: `apt-get install prometheus` (.ci/run does)"
    rules = yaml.safe_load(_one(hpa, "ConfigMap")["data"]["config.yaml"])["externalRules"]
    recording = []
    for rule in rules:
        series = rule["seriesQuery"].split("{", 1)[0]
        query = rule["metricsQuery"].replace("<<.Series>>", series)
        recording.append(
            {
                "record": f"check:{rule['name']['as']}",
                "expr": query.replace("<<.LabelMatchers>>", 'projection="x"'),
            }
        )
    path = tmp_path / "adapter.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "adapter", "rules": recording}]}))
    result = subprocess.run([binary, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_keda_checks_can_fail(keda: dict[tuple[str, str], dict[str, Any]]) -> None:
    version = KUBERNETES_VERSIONS[-1]
    scaled = copy.deepcopy(_one(keda, "ScaledObject"))
    assert schema_problems(scaled, version) == []
    scaled["spec"]["maxReplicas"] = 16
    scaled["spec"]["triggers"][0]["metadata"]["targetQueryValue"] = 5
    scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"][
        "stabilizationWindow"
    ] = 1
    found = schema_problems(scaled, version)
    assert any("maxReplicas" in p for p in found)
    assert any("metadata must map strings to strings" in p for p in found)
    assert any("stabilizationWindow" in p for p in found)


@pytest.mark.integration
def test_the_autoscalers_queries_return_one_number(
    keda: dict[tuple[str, str], dict[str, Any]], conn: Connection
) -> None:
    """What KEDA runs every pollingInterval, against a migrated database: one row, one number."""
    scaled = _one(keda, "ScaledObject")["spec"]
    for trigger in scaled["triggers"]:
        query = trigger["metadata"]["query"]
        name = re.search(r"projectionist_lag\('([^']+)'", query)
        assert name is not None
        for setup in ("no group yet", "a group"):
            if setup == "a group":
                register_group(conn, name[1], 16)
            rows = conn.execute(query).fetchall()
            assert len(rows) == 1 and len(rows[0]) == 1 and isinstance(rows[0][0], (int, float)), (
                setup,
                rows,
            )
