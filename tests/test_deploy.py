"""The production examples (deploy/kubernetes, deploy/systemd): the fields that decide whether they work.

A Deployment reading a StatefulSet label cannot work; these tests pin what
does: a StatefulSet whose pod ordinal becomes WORKER_ID (checked with the
real parser), PARTITIONS equal to the replica count, probes on /healthz and
/readyz, and a systemd template whose instance name is the partition.

Every manifest, and what each kustomization renders (tests/kustomize.py), is
also validated against Kubernetes' own schemas with kubernetes-validate, for
the oldest and the newest Kubernetes supported; the Prometheus Operator's
kinds, which those schemas do not include, get tests/crds.py's checks.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from projectionist import __version__
from projectionist.cli import ExitCode
from projectionist.errors import ConfigError
from projectionist.settings import Settings
from tests import crds, keda_crds, kustomize
from tests.helpers import ROOT

K8S = ROOT / "deploy" / "kubernetes"
#: Every kustomization: the workers, and the monitoring objects for kube-prometheus-stack.
KUSTOMIZATIONS = sorted(p.parent for p in K8S.rglob("kustomization.yaml"))
# The oldest Kubernetes the manifests support (pdb.yaml's unhealthyPodEvictionPolicy
# needs 1.27) and the newest whose schemas kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.27", kubernetes_validate.latest_version())
SYSTEMD = ROOT / "deploy" / "systemd"
UNIT = SYSTEMD / "projection-worker@.service"
UNIT_ENV = SYSTEMD / "projectionist.env"
MIGRATE_UNIT = SYSTEMD / "projectionist-migrate.service"


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
    total = env_of(worker)["PARTITIONS"]["value"]
    for ordinal in range(replicas):
        # What the downward API hands the container for pod <name>-<ordinal>.
        value = f"{sts['metadata']['name']}-{ordinal}" if field == "metadata.name" else str(ordinal)
        settings = Settings.from_env({"WORKER_ID": value, "PARTITIONS": total})
        assert settings.worker_id == ordinal
    # One replica too many is refused at start-up, not run as a partition that does not exist.
    with pytest.raises(ConfigError, match="less than the partition count"):
        Settings.from_env({"WORKER_ID": f"{sts['metadata']['name']}-{replicas}", "PARTITIONS": total})


def test_total_workers_equals_the_replica_count(
    k8s: dict[str, dict[str, Any]], worker: dict[str, Any]
) -> None:
    total = env_of(worker)["PARTITIONS"]["value"]
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
    total = env_of(worker)["PARTITIONS"]["value"]
    assert container["command"] == ["projectionist", "migrate", "--partitions", total]
    assert env_of(container)["DATABASE_URL"] == env_of(worker)["DATABASE_URL"]
    # Workers do not migrate (they refuse an unmigrated database): the Job is the step.
    assert worker["command"] == ["projectionist", "worker"]
    assert "MIGRATE" not in env_of(worker)
    secret = env_of(worker)["DATABASE_URL"]["valueFrom"]["secretKeyRef"]
    assert secret["name"] and secret["key"], "the database URL comes from a Secret, not the manifest"


def test_pods_get_no_service_link_variables() -> None:
    """Kubernetes gives every container <SERVICE>_PORT=tcp://... for each Service in the namespace
    unless enableServiceLinks is false; a Service named metrics would set METRICS_PORT."""
    templates = [t for obj in manifest_objects() for t in pod_templates(obj)]
    assert len(templates) >= 2, "the StatefulSet and the migrate Job"
    for template in templates:
        assert template["spec"].get("enableServiceLinks") is False, template["metadata"]
    injected = {"METRICS_PORT": "tcp://10.96.0.12:9100"}  # what a Service named "metrics" injects
    with pytest.raises(ConfigError, match="METRICS_PORT"):
        Settings.from_env({"WORKER_ID": "0", "TOTAL_WORKERS": "4", **injected})


# -- the manifests against Kubernetes' own schemas ------------------------------------------


def manifest_files() -> list[Path]:
    """Every manifest under deploy/kubernetes (a kustomization.yaml is kustomize's input, not an object)."""
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def manifest_objects() -> list[dict[str, Any]]:
    return [doc for path in manifest_files() for doc in yaml.safe_load_all(path.read_text()) if doc]


def pod_templates(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = obj.get("spec", {})
    templates = [spec.get("template"), spec.get("jobTemplate", {}).get("spec", {}).get("template")]
    return [t for t in templates if isinstance(t, dict) and "containers" in t.get("spec", {})]


def schema_problems(obj: dict[str, Any], version: str) -> list[str]:
    """Kubernetes' OpenAPI schema for the object's kind (strict: unknown fields are errors), or,
    for the Prometheus Operator's kinds, which are CRDs and not in those schemas, tests/crds.py,
    and for KEDA's, tests/keda_crds.py."""
    if obj.get("apiVersion") == crds.API_VERSION:
        return crds.problems(obj)
    if obj.get("apiVersion") == keda_crds.API_VERSION:
        return keda_crds.problems(obj, version)
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(item) for item in e.path)
        return [f"{obj['kind']} {obj['metadata']['name']}: {path}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [f"{e.message}: a typo in kind or apiVersion, or a CRD tests/crds.py should check"]
    return []


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_every_manifest_matches_the_kubernetes_schema(path: Path, version: str) -> None:
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    assert docs, f"{path} holds no object"
    assert [p for doc in docs for p in schema_problems(doc, version)] == []


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(ROOT)))
def test_what_kustomize_renders_matches_the_kubernetes_schema(directory: Path, version: str) -> None:
    objects = kustomize.render(directory)
    assert objects
    assert [p for obj in objects for p in schema_problems(obj, version)] == []
    for obj in objects:
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "projectionist"


def test_every_kustomization_lists_its_directory() -> None:
    for directory in KUSTOMIZATIONS:
        resources = yaml.safe_load((directory / "kustomization.yaml").read_text())["resources"]
        assert len(resources) == len(set(resources)), directory
        for resource in resources:
            path = directory / resource
            assert path.is_file() or (path / "kustomization.yaml").is_file(), f"{directory}: {resource}"
    monitoring = K8S / "monitoring"
    assert monitoring in KUSTOMIZATIONS
    listed = yaml.safe_load((monitoring / "kustomization.yaml").read_text())["resources"]
    assert set(listed) == {p.name for p in monitoring.glob("*.yaml")} - {"kustomization.yaml"}


def test_schema_check_catches_broken_manifests() -> None:
    """The checks above can fail: a misspelt field, a wrong type, a broken CRD object."""
    version = KUBERNETES_VERSIONS[-1]
    sts = yaml.safe_load((K8S / "statefulset.yaml").read_text())
    typo = json.loads(json.dumps(sts))
    typo["spec"]["template"]["spec"]["terminationGracePeriod"] = 30
    assert any("terminationGracePeriod" in p for p in schema_problems(typo, version))
    wrong_type = json.loads(json.dumps(sts))
    wrong_type["spec"]["template"]["spec"]["enableServiceLinks"] = "false"
    assert any("enableServiceLinks" in p for p in schema_problems(wrong_type, version))
    unknown_kind = {"apiVersion": "apps/v1", "kind": "StatefullSet", "metadata": {"name": "x"}}
    assert schema_problems(unknown_kind, version)
    monitor = yaml.safe_load((K8S / "podmonitor.yaml").read_text())
    monitor["spec"]["podMetricsEndpoints"][0]["interval"] = "15 seconds"
    monitor["spec"]["podMetricsEndpoint"] = []
    found = schema_problems(monitor, version)
    assert any("not a duration" in p for p in found) and any("podMetricsEndpoint'" in p for p in found)


def test_every_image_is_pinned() -> None:
    rendered = [obj for directory in KUSTOMIZATIONS for obj in kustomize.render(directory)]
    images = [
        c["image"]
        for obj in [*manifest_objects(), *rendered]
        for template in pod_templates(obj)
        for c in template["spec"]["containers"] + template["spec"].get("initContainers", [])
    ]
    assert images
    for image in images:
        assert "@sha256:" in image or ":" in image.rsplit("/", 1)[-1], f"{image} has no tag"
        assert image.rsplit(":", 1)[-1] not in ("latest", "main", "master"), f"{image} is not pinned"


# -- the kustomize renderer the tests above use ----------------------------------------------


def _by_name(objects: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objects}


@pytest.fixture(scope="module")
def real_kustomize() -> list[str]:
    command = kustomize.real_kustomize()
    if command is None:
        pytest.skip("no kustomize v5 (standalone or in kubectl) to compare tests/kustomize.py against")
    return command


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(ROOT)))
def test_renderer_agrees_with_real_kustomize(real_kustomize: list[str], directory: Path) -> None:
    assert _by_name(kustomize.render(directory)) == _by_name(kustomize.render_with(real_kustomize, directory))


def _renderer_example(tmp_path: Path) -> Path:
    shutil.copy(K8S / "statefulset.yaml", tmp_path)
    shutil.copy(K8S / "migrate-job.yaml", tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "resources": ["statefulset.yaml", "migrate-job.yaml"],
                "labels": [{"pairs": {"team": "data"}, "includeSelectors": False, "includeTemplates": True}],
                "images": [
                    {"name": "projectionist", "newName": "registry.example/projectionist", "newTag": "9"}
                ],
            }
        )
    )
    return tmp_path


def test_renderer_applies_labels_and_images(tmp_path: Path) -> None:
    objects = _by_name(kustomize.render(_renderer_example(tmp_path)))
    sts = objects[("StatefulSet", "projection-worker")]
    assert sts["metadata"]["labels"]["team"] == "data"
    assert sts["spec"]["template"]["metadata"]["labels"]["team"] == "data"
    assert "team" not in sts["spec"]["selector"]["matchLabels"]
    for obj in objects.values():
        (container,) = obj["spec"]["template"]["spec"]["containers"]
        assert container["image"] == "registry.example/projectionist:9"
    (tmp_path / "kustomization.yaml").write_text("resources: [statefulset.yaml]\nnamespace: x\n")
    with pytest.raises(kustomize.Unsupported, match="namespace"):
        kustomize.render(tmp_path)


def test_renderer_agrees_with_real_kustomize_on_labels_and_images(
    real_kustomize: list[str], tmp_path: Path
) -> None:
    directory = _renderer_example(tmp_path)
    assert _by_name(kustomize.render(directory)) == _by_name(kustomize.render_with(real_kustomize, directory))


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
    assert settings.partitions == int(env_file["PARTITIONS"])
    assert settings.database_url, "the environment file must set DATABASE_URL"


def test_environment_file_documents_the_group_settings() -> None:
    env_file = read_env(UNIT_ENV)
    assert {"DATABASE_URL", "PARTITIONS", "METRICS_BASE_PORT"} <= set(env_file)
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
    shutil.copy(MIGRATE_UNIT, tmp_path / MIGRATE_UNIT.name)  # the unit it requires
    assert verify_complaints(tmp_path / UNIT.name) == []


def test_workers_start_only_after_the_migrate_unit(unit: dict[str, dict[str, str]], tmp_path: Path) -> None:
    # Workers refuse an unmigrated database; the migrate unit is the explicit step before them.
    assert "projectionist-migrate.service" in unit["Unit"]["Requires"]
    assert "projectionist-migrate.service" in unit["Unit"]["After"]
    migrate = {n: dict(p) for n, p in unit_sections(MIGRATE_UNIT.read_text()).items()}
    assert migrate["Service"]["Type"] == "oneshot" and migrate["Service"]["RemainAfterExit"] == "yes"
    assert "projectionist migrate --partitions" in migrate["Service"]["ExecStart"]
    env_files = [v for k, v in unit_sections(MIGRATE_UNIT.read_text())["Service"] if k == "EnvironmentFile"]
    # The migrating role's file comes last, so its DATABASE_URL wins over the workers'.
    assert env_files == ["/etc/projectionist/worker.env", "/etc/projectionist/migrate.env"]
    shutil.copy(MIGRATE_UNIT, tmp_path / MIGRATE_UNIT.name)
    assert verify_complaints(tmp_path / MIGRATE_UNIT.name) == []


def test_systemd_verify_catches_a_bad_unit(tmp_path: Path) -> None:
    bad = tmp_path / "bad@.service"
    bad.write_text(UNIT.read_text().replace("Restart=on-failure", "Restart=sometimes"))
    assert any("sometimes" in line for line in verify_complaints(bad))
