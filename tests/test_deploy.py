"""The production examples (deploy/kubernetes, deploy/systemd): the fields that decide whether they work.

The seed's Kubernetes example was a Deployment reading a StatefulSet label,
which cannot work; these tests pin the corrections: a StatefulSet whose pod
ordinal becomes WORKER_ID (checked with the real parser), TOTAL_WORKERS equal
to the replica count, probes on /healthz and /readyz, and a systemd template
whose instance name is the partition.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from projectionist import __version__
from projectionist.cli import ExitCode
from projectionist.errors import ConfigError
from projectionist.settings import Settings
from tests.helpers import ROOT

K8S = ROOT / "deploy" / "kubernetes"
SYSTEMD = ROOT / "deploy" / "systemd"
UNIT = SYSTEMD / "projection-worker@.service"
UNIT_ENV = SYSTEMD / "projectionist.env"


def k8s_objects() -> dict[str, dict[str, Any]]:
    """Every manifest object, by kind (each kind appears once)."""
    objects: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is None:
                continue
            assert doc["kind"] not in objects, f"two {doc['kind']} objects"
            objects[doc["kind"]] = doc
    return objects


@pytest.fixture(scope="module")
def k8s() -> dict[str, dict[str, Any]]:
    return k8s_objects()


@pytest.fixture(scope="module")
def worker(k8s: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (container,) = k8s["StatefulSet"]["spec"]["template"]["spec"]["containers"]
    return container


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container["env"]}


# -- Kubernetes ----------------------------------------------------------------------------


def test_manifests_parse_and_kustomization_lists_existing_files(k8s: dict[str, dict[str, Any]]) -> None:
    kustomization = k8s["Kustomization"]
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file(), resource
    listed = set(kustomization["resources"])
    # The PodMonitor needs the Prometheus Operator's CRDs: applied separately, on purpose.
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "podmonitor.yaml"}
    for kind, obj in k8s.items():
        if kind != "Kustomization":
            assert obj["apiVersion"] and obj["metadata"]["name"], kind


def test_workers_are_a_statefulset_not_a_deployment(k8s: dict[str, dict[str, Any]]) -> None:
    assert "Deployment" not in k8s, "a Deployment's pods have no ordinal to become WORKER_ID"
    sts = k8s["StatefulSet"]
    assert sts["apiVersion"] == "apps/v1"
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert sts["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_worker_id_is_the_pod_ordinal(k8s: dict[str, dict[str, Any]], worker: dict[str, Any]) -> None:
    sts = k8s["StatefulSet"]
    field = env_of(worker)["WORKER_ID"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert field in ("metadata.name", "metadata.labels['apps.kubernetes.io/pod-index']")
    replicas = sts["spec"]["replicas"]
    total = env_of(worker)["TOTAL_WORKERS"]["value"]
    for ordinal in range(replicas):
        # What the downward API hands the container for pod <name>-<ordinal>.
        value = f"{sts['metadata']['name']}-{ordinal}" if field == "metadata.name" else str(ordinal)
        settings = Settings.from_env({"WORKER_ID": value, "TOTAL_WORKERS": total})
        assert settings.worker_id == ordinal
    # One replica too many is refused at start-up, not run as a partition that does not exist.
    with pytest.raises(ConfigError, match="less than the partition count"):
        Settings.from_env({"WORKER_ID": f"{sts['metadata']['name']}-{replicas}", "TOTAL_WORKERS": total})


def test_total_workers_equals_the_replica_count(
    k8s: dict[str, dict[str, Any]], worker: dict[str, Any]
) -> None:
    total = env_of(worker)["TOTAL_WORKERS"]["value"]
    assert isinstance(total, str), "env values are strings in Kubernetes"
    assert int(total) == k8s["StatefulSet"]["spec"]["replicas"]


def test_probes_hit_healthz_and_readyz_on_the_metrics_port(worker: dict[str, Any]) -> None:
    metrics_port = int(env_of(worker)["METRICS_PORT"]["value"])
    ports = {p["name"]: p["containerPort"] for p in worker["ports"]}
    assert ports["metrics"] == metrics_port
    assert worker["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert worker["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert worker["startupProbe"]["httpGet"]["path"] == "/healthz"
    # A slow start must not be killed by the liveness probe.
    assert worker["startupProbe"]["periodSeconds"] * worker["startupProbe"]["failureThreshold"] >= 30


def test_resources_and_security(k8s: dict[str, dict[str, Any]], worker: dict[str, Any]) -> None:
    requests = worker["resources"]["requests"]
    assert requests["cpu"] and requests["memory"]
    assert worker["resources"]["limits"]["memory"]
    pod = k8s["StatefulSet"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    dockerfile_user = re.findall(r"^USER (\d+)", (ROOT / "Dockerfile").read_text(), re.M)[-1]
    assert str(pod["securityContext"]["runAsUser"]) == dockerfile_user
    assert worker["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["terminationGracePeriodSeconds"] >= 10, "time for the graceful first SIGTERM"


def test_image_is_the_released_version(k8s: dict[str, dict[str, Any]], worker: dict[str, Any]) -> None:
    job_container = k8s["Job"]["spec"]["template"]["spec"]["containers"][0]
    for image in (worker["image"], job_container["image"]):
        assert image == f"projectionist:{__version__}"
    assert k8s["Kustomization"]["images"] == [{"name": "projectionist", "newTag": __version__}]


def test_headless_service_and_disruption_budget(k8s: dict[str, dict[str, Any]]) -> None:
    sts = k8s["StatefulSet"]
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    service = k8s["Service"]
    assert service["spec"]["clusterIP"] == "None"
    assert sts["spec"]["serviceName"] == service["metadata"]["name"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    pdb = k8s["PodDisruptionBudget"]
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1
    # A failing (unready) worker must not block node drains: it processes nothing anyway.
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


def test_prometheus_discovers_the_workers(k8s: dict[str, dict[str, Any]], worker: dict[str, Any]) -> None:
    template = k8s["StatefulSet"]["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == env_of(worker)["METRICS_PORT"]["value"]
    monitor = k8s["PodMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"


def test_migration_runs_as_a_job_and_workers_skip_it(
    k8s: dict[str, dict[str, Any]], worker: dict[str, Any]
) -> None:
    job = k8s["Job"]
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in ("OnFailure", "Never")
    (container,) = pod["containers"]
    total = env_of(worker)["TOTAL_WORKERS"]["value"]
    assert container["command"] == ["projectionist", "migrate", "--partition-indexes", total]
    assert env_of(container)["DATABASE_URL"] == env_of(worker)["DATABASE_URL"]
    assert worker["command"] == ["projectionist", "worker", "--no-migrate"]
    secret = env_of(worker)["DATABASE_URL"]["valueFrom"]["secretKeyRef"]
    assert secret["name"] and secret["key"], "the database URL comes from a Secret, not the manifest"


# -- systemd -----------------------------------------------------------------------------


def unit_sections(text: str) -> dict[str, list[tuple[str, str]]]:
    sections: dict[str, list[tuple[str, str]]] = {}
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            sections[current] = []
            continue
        key, _, value = line.partition("=")
        sections[current].append((key.strip(), value.strip()))
    return sections


@pytest.fixture(scope="module")
def unit() -> dict[str, dict[str, str]]:
    return {name: dict(pairs) for name, pairs in unit_sections(UNIT.read_text()).items()}


def read_env(path: Path) -> dict[str, str]:
    return {
        k: v
        for k, _, v in (
            line.partition("=") for line in path.read_text().splitlines() if line and not line.startswith("#")
        )
    }


def test_unit_is_a_template_whose_instance_is_the_partition(unit: dict[str, dict[str, str]]) -> None:
    assert UNIT.name == "projection-worker@.service"
    exec_start = unit["Service"]["ExecStart"]
    assert "--worker-id %i" in exec_start, "the instance name is the partition"
    assert unit["Service"]["EnvironmentFile"] == "/etc/projectionist/worker.env"
    assert unit["Service"]["Restart"] == "on-failure"
    assert unit["Service"]["RestartPreventExitStatus"] == str(ExitCode.CONFIG)
    assert unit["Service"]["KillSignal"] == "SIGTERM"
    assert unit["Service"]["User"] not in ("", "root")
    assert "postgresql.service" in unit["Unit"]["After"]
    assert unit["Install"]["WantedBy"] == "multi-user.target"


@pytest.mark.parametrize("instance", [0, 3])
def test_instances_start_their_own_partition_on_their_own_port(
    unit: dict[str, dict[str, str]], instance: int
) -> None:
    """Expand the unit as systemd would and run its ExecStart with `projectionist` replaced by echo."""
    env_file = read_env(UNIT_ENV)
    exec_start = unit["Service"]["ExecStart"].replace("%i", str(instance)).replace("$$", "$")
    argv = exec_start.split(None, 2)
    assert argv[:2] == ["/bin/sh", "-c"]
    script = argv[2].strip("'").replace("/opt/projectionist/bin/projectionist", "echo")
    result = subprocess.run(
        ["sh", "-c", script], capture_output=True, text=True, env={**os.environ, **env_file}, timeout=10
    )
    assert result.returncode == 0, result.stderr
    args = result.stdout.split()
    assert args[0] == "worker"
    worker_id = args[args.index("--worker-id") + 1]
    metrics_port = int(args[args.index("--metrics-port") + 1])
    assert metrics_port == int(env_file["METRICS_BASE_PORT"]) + instance
    settings = Settings.from_env(env_file, worker_id=int(worker_id), metrics_port=metrics_port)
    assert settings.worker_id == instance
    assert settings.partitions == int(env_file["TOTAL_WORKERS"])
    assert settings.database_url, "the environment file must set DATABASE_URL"


def test_environment_file_documents_the_group_settings() -> None:
    env_file = read_env(UNIT_ENV)
    assert {"DATABASE_URL", "TOTAL_WORKERS", "METRICS_BASE_PORT"} <= set(env_file)
    assert "WORKER_ID" not in env_file, "the partition comes from the instance name"
    assert "CHANGE-ME" in env_file["DATABASE_URL"], "no real password in the example"


def verify_complaints(template: Path, instance: str = "2") -> list[str]:
    """systemd-analyze verify's messages about ``template`` (it reports bad keys and values
    as messages naming the file, not through its exit code)."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing (Debian package systemd)"
    instance_path = template.with_name(template.name.replace("@.", f"@{instance}."))
    result = subprocess.run(
        [analyze, "verify", str(instance_path)], capture_output=True, text=True, timeout=60
    )
    return [
        line for line in result.stderr.splitlines() if template.name in line or instance_path.name in line
    ]


def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    shutil.copy(UNIT, tmp_path / UNIT.name)
    assert verify_complaints(tmp_path / UNIT.name) == []


def test_systemd_verify_catches_a_bad_unit(tmp_path: Path) -> None:
    bad = tmp_path / "bad@.service"
    bad.write_text(UNIT.read_text().replace("Restart=on-failure", "Restart=sometimes"))
    assert any("sometimes" in line for line in verify_complaints(bad))
