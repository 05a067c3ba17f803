"""The compose stack, validated without a Docker engine: the compose file, its configs, the Dockerfile.

Compose interpolation (``${VAR:-default}``) is resolved with the documented
defaults in ``compose/.env.example``, as ``make up`` does on a fresh clone.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from dashboards import rules

from tests.helpers import ROOT

COMPOSE_DIR = ROOT / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
ENV_EXAMPLE = COMPOSE_DIR / ".env.example"
PROMETHEUS_CONFIG = COMPOSE_DIR / "prometheus.yml"
RULES_DIR = ROOT / "deploy" / "prometheus" / "rules"

# These images ship no shell and no HTTP client, so a healthcheck cannot run in
# them; their dependants wait for service_started (traces are best effort).
NO_HEALTHCHECK_IMAGES = ("otel/opentelemetry-collector-contrib", "grafana/tempo")
ONE_SHOT = {"migrate"}

_VAR = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|\$\$")


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
            env[key.strip()] = value.strip()
    return env


def interpolate(node: Any, env: dict[str, str]) -> Any:
    """Compose's variable substitution, for the forms the file uses."""
    if isinstance(node, dict):
        return {k: interpolate(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(v, env) for v in node]
    if not isinstance(node, str):
        return node

    def substitute(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group("name"), m.group("op"), m.group("arg")
        value = env.get(name)
        if op in (":-", "-"):
            return value if value or (op == "-" and value is not None) else arg
        if op in (":?", "?"):
            if not value and not (op == "?" and value is not None):
                raise AssertionError(f"${{{name}}} is required: {arg}")
            return value or ""
        return value or ""

    return _VAR.sub(substitute, node)


def variables_used(text: str) -> set[str]:
    return {m.group("name") for m in _VAR.finditer(text) if m.group("name")}


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return data


@pytest.fixture(scope="module")
def env() -> dict[str, str]:
    return read_env_file(ENV_EXAMPLE)


@pytest.fixture(scope="module")
def compose(raw: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    data: dict[str, Any] = interpolate(raw, env)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in compose["services"].items() if not name.startswith("x-")}


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: str(v) for k, v in env.items()}


def command(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command", [])
    return cmd.split() if isinstance(cmd, str) else [str(c) for c in cmd]


def worker_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in services.items() if command(s)[:2] == ["projectionist", "worker"]}


def published(service: dict[str, Any]) -> list[tuple[str, int, int]]:
    """(host ip, host port, container port) of every published port."""
    out = []
    for port in service.get("ports", []):
        parts = str(port).split(":")
        assert len(parts) == 3, f"publish with an explicit host address: {port!r}"
        out.append((parts[0], int(parts[1]), int(parts[2].split("/")[0])))
    return out


# -- the file itself ---------------------------------------------------------------


def test_every_variable_is_documented_in_env_example(env: dict[str, str]) -> None:
    used = variables_used(COMPOSE_FILE.read_text())
    assert used, "the compose file takes no settings from .env?"
    assert used <= set(env), f"not in compose/.env.example: {sorted(used - set(env))}"
    example = ENV_EXAMPLE.read_text()
    for name in env:
        # Each setting has a comment somewhere above it in its section.
        assert re.search(rf"^{name}=", example, re.M)
    assert "#" in example.split("POSTGRES_PASSWORD=")[0], "the passwords are documented"


def test_passwords_come_from_env_and_are_required(raw: dict[str, Any], env: dict[str, str]) -> None:
    found = 0
    for name, svc in raw["services"].items():
        for key, value in environment(svc).items():
            if "PASSWORD" in key:
                found += 1
                assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]+\}", value), (
                    f"{name}.{key} must be a required ${{VAR:?...}} from compose/.env, not {value!r}"
                )
            if key == "DATABASE_URL":
                userinfo = interpolate(value, env).split("://", 1)[1].split("@", 1)[0]
                assert ":" not in userinfo, f"{name}: no password in DATABASE_URL (PGPASSWORD carries it)"
    assert found >= 3  # postgres, the app's PGPASSWORD, Grafana's admin


def test_real_env_file_is_git_ignored() -> None:
    assert ".env" in (COMPOSE_DIR / ".gitignore").read_text().split()


def test_interpolation_understands_the_forms_used() -> None:
    env = {"A": "1", "EMPTY": ""}
    assert interpolate("${A:-2} ${B:-3} ${EMPTY:-4} ${EMPTY-5} $${X}", env) == "1 3 4  ${X}"
    with pytest.raises(AssertionError, match="required"):
        interpolate("${MISSING:?set it}", env)


def test_every_mounted_file_exists(services: dict[str, dict[str, Any]], compose: dict[str, Any]) -> None:
    named = set(compose.get("volumes") or {})
    for name, svc in services.items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                path = (COMPOSE_DIR / source).resolve()
                assert path.exists(), f"{name} mounts {source}, which does not exist"
            else:
                assert source in named, f"{name} uses undeclared volume {source}"


def test_services_use_only_declared_networks(
    services: dict[str, dict[str, Any]], compose: dict[str, Any]
) -> None:
    declared = set(compose.get("networks") or {})
    for name, svc in services.items():
        networks = svc.get("networks", [])
        assert networks, f"{name} is on no declared network"
        for network in networks:
            assert network in declared, f"{name} uses undeclared network {network}"


def test_published_ports_are_unique_and_on_localhost(services: dict[str, dict[str, Any]]) -> None:
    seen: dict[int, str] = {}
    for name, svc in services.items():
        for host_ip, host_port, _ in published(svc):
            assert host_ip == "127.0.0.1", f"{name} publishes beyond localhost: {host_ip}:{host_port}"
            assert host_port not in seen, f"{name} and {seen[host_port]} both publish {host_port}"
            seen[host_port] = name
    assert published(services["postgres"]) == [("127.0.0.1", 5432, 5432)]


def check_compose_schema(path: Path) -> subprocess.CompletedProcess[str]:
    """check-jsonschema against the Compose Specification's JSON schema, which it ships (no network)."""
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_compose_file_matches_the_compose_specification(compose: dict[str, Any], tmp_path: Path) -> None:
    # As written, and as Docker Compose sees it once compose/.env.example's values are substituted.
    interpolated = tmp_path / "docker-compose.yml"
    interpolated.write_text(yaml.safe_dump(compose, sort_keys=False))
    for path in (COMPOSE_FILE, interpolated):
        result = check_compose_schema(path)
        assert result.returncode == 0, f"{path}:\n{result.stdout}{result.stderr}"


def test_compose_schema_check_catches_a_broken_file(raw: dict[str, Any], tmp_path: Path) -> None:
    broken = json.loads(json.dumps(raw))
    broken["services"]["postgres"]["restart_policy"] = "always"  # not a service field
    broken["services"]["api"]["depends_on"]["migrate"]["condition"] = "service_done"
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(broken, sort_keys=False))
    result = check_compose_schema(path)
    assert result.returncode != 0
    assert "restart_policy" in result.stdout and "service_done" in result.stdout


def test_images_are_pinned(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        image = svc.get("image")
        assert image, f"{name} has no image"
        assert "@sha256:" in image or ":" in image.rsplit("/", 1)[-1], f"{name}: {image} has no tag"
        tag = image.rsplit(":", 1)[-1]
        assert tag not in ("latest", "main", "master", ""), f"{name}: {image} is not pinned"
        if "build" not in svc:
            assert re.search(r"\d", tag), f"{name}: {image} should pin a version"


def test_app_services_build_the_repository_dockerfile(services: dict[str, dict[str, Any]]) -> None:
    built = [n for n, s in services.items() if "build" in s]
    assert "migrate" in built and "api" in built and set(worker_services(services)) <= set(built)
    stages = dockerfile_stages()
    for name in built:
        build = services[name]["build"]
        context = (COMPOSE_DIR / build["context"]).resolve()
        assert context == ROOT, name
        assert (context / build["dockerfile"]).is_file()
        assert build["target"] in stages, f"{name}: no stage {build['target']} in the Dockerfile"
        if build["target"] == "runtime":
            assert services[name]["image"] == services["migrate"]["image"], "one image for the app"
    assert services["locust"]["build"]["target"] == "loadtest"
    assert services["locust"]["profiles"] == ["load"], "Locust runs only under the load profile"
    assert command(services["locust"])[:3] == ["locust", "-f", "loadtest/locustfile.py"]
    assert (ROOT / "loadtest" / "locustfile.py").is_file()


def test_loadtest_image_installs_the_extra_that_brings_locust() -> None:
    import tomllib

    (extra,) = re.findall(r'pip install "\.\[(\w+)\]"', (ROOT / "Dockerfile").read_text())
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extra in extras, f"the Dockerfile installs .[{extra}], which pyproject.toml does not define"
    assert any(req.startswith("locust") for req in extras[extra])


# -- ordering and health ---------------------------------------------------------------


def test_long_running_services_have_healthchecks(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        if name in ONE_SHOT:
            assert svc.get("restart") == "no"
            continue
        if svc["image"].startswith(NO_HEALTHCHECK_IMAGES):
            assert "healthcheck" not in svc
            continue
        check = svc.get("healthcheck")
        assert check and check.get("test"), f"{name} has no healthcheck"
        assert check.get("interval") and check.get("retries"), name


def test_depends_on_waits_for_health_and_migration(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        depends = svc.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: use the long depends_on form with conditions"
        for dep, spec in depends.items():
            assert dep in services, f"{name} depends on unknown {dep}"
            condition = spec["condition"]
            if dep in ONE_SHOT:
                assert condition == "service_completed_successfully", f"{name} -> {dep}"
            elif "healthcheck" in services[dep]:
                assert condition == "service_healthy", f"{name} -> {dep}"
            else:
                assert condition == "service_started", f"{name} -> {dep}"
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    # Migrations, then the partition indexes of the workers' partition count.
    counts = {services[name]["environment"]["PARTITIONS"] for name in worker_services(services)}
    assert command(services["migrate"]) == ["projectionist", "migrate", "--partitions", *counts]
    for name in ["api", *worker_services(services)]:
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_workers_cover_every_partition_exactly_once(services: dict[str, dict[str, Any]]) -> None:
    workers = worker_services(services)
    assert len(workers) == 4, "four workers, one per partition"
    totals = {environment(s)["PARTITIONS"] for s in workers.values()}
    assert len(totals) == 1, f"workers disagree on PARTITIONS: {totals}"
    total = int(totals.pop())
    ids = sorted(int(environment(s)["WORKER_ID"]) for s in workers.values())
    assert ids == list(range(total)), f"WORKER_IDs {ids} do not cover 0..{total - 1} exactly once"
    for name, svc in workers.items():
        assert name == f"worker-{environment(svc)['WORKER_ID']}"
        assert "container_name" not in svc, "scale-workers needs services it can scale"
        assert "ports" not in svc, "workers publish no host port (several may run per service)"
        # Migrating is the migrate service's step; a worker never migrates.
        assert "--migrate" not in command(svc) and "MIGRATE" not in environment(svc)
        port = environment(svc)["METRICS_PORT"]
        assert f"127.0.0.1:{port}/healthz" in " ".join(svc["healthcheck"]["test"])
        assert environment(svc)["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4318"


def test_workers_stop_gracefully(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in worker_services(services).items():
        assert svc.get("stop_grace_period"), name
        assert svc.get("stop_signal", "SIGTERM") == "SIGTERM"


def test_postgres_keeps_data_and_ends_idle_transactions(services: dict[str, dict[str, Any]]) -> None:
    pg = services["postgres"]
    assert "pgdata:/var/lib/postgresql" in pg["volumes"]  # the PostgreSQL 18 image layout
    assert any(c.startswith("idle_in_transaction_session_timeout=") for c in command(pg))
    assert pg["image"].startswith("postgres:")


# -- Prometheus -------------------------------------------------------------------------


def metrics_ports(services: dict[str, dict[str, Any]]) -> dict[str, set[int]]:
    """Ports on which each service serves Prometheus metrics, read from the services' own config."""
    ports: dict[str, set[int]] = {}
    for name in worker_services(services):
        ports[name] = {int(environment(services[name])["METRICS_PORT"])}
    ports["api"] = {int(environment(services["api"])["API_PORT"])}
    ports["prometheus"] = {9090}
    ports["grafana"] = {int(environment(services["grafana"]).get("GF_SERVER_HTTP_PORT", "3000"))}
    tempo = yaml.safe_load((COMPOSE_DIR / "tempo.yml").read_text())
    ports["tempo"] = {int(tempo["server"]["http_listen_port"])}
    collector = yaml.safe_load((COMPOSE_DIR / "otel-collector.yml").read_text())
    readers = collector["service"]["telemetry"]["metrics"]["readers"]
    ports["otel-collector"] = {int(r["pull"]["exporter"]["prometheus"]["port"]) for r in readers}
    if "locust" in services:
        ports["locust"] = {int(environment(services["locust"])["LOAD_METRICS_PORT"])}
    # The exporter's --web.listen-address, else its default port.
    listen = [a for a in command(services["postgres-exporter"]) if a.startswith("--web.listen-address=")]
    ports["postgres-exporter"] = {int(listen[-1].rsplit(":", 1)[1]) if listen else 9187}
    return ports


def scrape_targets(config: dict[str, Any]) -> list[tuple[str, str, int]]:
    """(job, host, port) for static and DNS-discovered targets."""
    out = []
    for job in config["scrape_configs"]:
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, _, port = target.rpartition(":")
                out.append((job["job_name"], host, int(port)))
        for dns in job.get("dns_sd_configs", []):
            assert dns.get("type", "SRV") == "A", "compose DNS answers A records"
            out.extend((job["job_name"], host, int(dns["port"])) for host in dns["names"])
    return out


def test_every_scrape_target_is_a_service_port_that_serves_metrics(
    services: dict[str, dict[str, Any]],
) -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    # Elastic mode's one worker service comes from its override file (tests/test_compose_elastic.py).
    elastic = yaml.safe_load((COMPOSE_DIR / "docker-compose.elastic.yml").read_text())["services"]
    known = {**services, "worker-elastic": elastic["worker-elastic"]}
    ports = metrics_ports(known)
    targets = scrape_targets(config)
    for job, host, port in targets:
        service = "prometheus" if (job == "prometheus" and host == "localhost") else host
        assert service in known, f"job {job}: {host} is not a compose service"
        assert port in ports.get(service, set()), f"job {job}: {service} serves no metrics on {port}"
    scraped = {host for _, host, _ in targets}
    assert set(worker_services(services)) <= scraped, "every worker is scraped"
    assert "api" in scraped


def test_locust_is_scraped_when_it_runs(services: dict[str, dict[str, Any]]) -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert ("locust", "locust", 9646) in scrape_targets(config)


def test_prometheus_keeps_exemplars_and_mounts_the_rules(services: dict[str, dict[str, Any]]) -> None:
    prom = services["prometheus"]
    assert "--enable-feature=exemplar-storage" in command(prom)
    assert "--config.file=/etc/prometheus/prometheus.yml" in command(prom)
    mounts = {v.split(":")[1]: v.split(":")[0] for v in prom["volumes"]}
    assert mounts["/etc/prometheus/prometheus.yml"] == "./prometheus.yml"
    # Mounted from deploy/, not copied: one rules file for compose, Kubernetes and the tests.
    assert (COMPOSE_DIR / mounts["/etc/prometheus/rules"]).resolve() == RULES_DIR
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    # Listed by name (a glob would load the promtool test files too): every rule file, nothing else.
    assert config["rule_files"] == [f"rules/{p.name}" for p in rules.rule_files()]
    assert "rules/projectionist-alerts.yml" in config["rule_files"]
    assert config["global"]["scrape_interval"] == "5s"
    datasources = yaml.safe_load(
        (COMPOSE_DIR / "grafana/provisioning/datasources/datasources.yml").read_text()
    )
    (prom_ds,) = [d for d in datasources["datasources"] if d["type"] == "prometheus"]
    assert prom_ds["jsonData"]["timeInterval"] == config["global"]["scrape_interval"]


def test_promtool_accepts_the_real_config_with_the_real_rules(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: apt-get install prometheus (.ci/run does)"
    # Mirror the container: /etc/prometheus/prometheus.yml next to the mounted rules/.
    shutil.copy(PROMETHEUS_CONFIG, tmp_path / "prometheus.yml")
    (tmp_path / "rules").symlink_to(RULES_DIR, target_is_directory=True)
    result = subprocess.run(
        [promtool, "check", "config", str(tmp_path / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "projectionist-alerts.yml" in output, f"the rule files were not found:\n{output}"
    assert "FAILED" not in output


def test_promtool_rejects_a_broken_config(tmp_path: Path) -> None:
    """The check above can fail: a rules file with a broken expression is refused."""
    promtool = shutil.which("promtool")
    assert promtool
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "projectionist-alerts.yml").write_text(
        "groups:\n  - name: x\n    rules:\n      - alert: A\n        expr: up ==\n"
    )
    shutil.copy(PROMETHEUS_CONFIG, tmp_path / "prometheus.yml")
    result = subprocess.run(
        [promtool, "check", "config", str(tmp_path / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0


# -- traces -----------------------------------------------------------------------------


def test_trace_pipeline_is_wired_collector_to_tempo(services: dict[str, dict[str, Any]]) -> None:
    collector = yaml.safe_load((COMPOSE_DIR / "otel-collector.yml").read_text())
    assert collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"] == "0.0.0.0:4318"
    pipeline = collector["service"]["pipelines"]["traces"]
    assert pipeline["receivers"] == ["otlp"]
    (exporter,) = pipeline["exporters"]
    assert collector["exporters"][exporter]["endpoint"] == "tempo:4317"
    for processor in pipeline["processors"]:
        assert processor in collector["processors"]
    tempo = yaml.safe_load((COMPOSE_DIR / "tempo.yml").read_text())
    # Tempo >= 2.7 binds receivers to localhost unless told otherwise.
    assert tempo["distributor"]["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"] == "0.0.0.0:4317"
    assert services["tempo"]["image"].startswith("grafana/tempo:2.")
    assert not any("jaegertracing/all-in-one" in s["image"] for s in services.values()), "Jaeger v1 is EOL"
    mounts = {v.split(":")[1]: v.split(":")[0] for v in services["otel-collector"]["volumes"]}
    assert any(c.endswith(tuple(mounts)) for c in command(services["otel-collector"]))


# -- Dockerfile ---------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """Stage name -> its instructions (FROM included)."""
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for kw, rest in dockerfile_instructions():
        if kw == "FROM":
            words = rest.split()
            assert len(words) == 3 and words[1].upper() == "AS", f"name every stage: FROM {rest}"
            current = stages.setdefault(words[2], [])
        current.append((kw, rest))
    return stages


def test_dockerfile_is_multi_stage_pinned_and_non_root() -> None:
    instructions = dockerfile_instructions()
    args = {
        rest.split("=", 1)[0]: rest.split("=", 1)[1]
        for kw, rest in instructions
        if kw == "ARG" and "=" in rest
    }
    stages = dockerfile_stages()
    assert len(stages) >= 2, "multi-stage"
    assert list(stages)[-1] == "runtime", "the default target (the last stage) is the application"
    for name, body in stages.items():
        image = body[0][1].split()[0]
        if image in stages:
            continue  # built on an earlier stage
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        tag = image.rsplit(":", 1)[-1]
        assert ":" in image and tag != "latest" and re.search(r"\d+\.\d+", tag), f"{name}: unpinned {image}"
    for final in ("runtime", "loadtest"):
        users = [rest for kw, rest in stages[final] if kw == "USER"]
        assert users, f"{final} sets a USER"
        uid = users[-1].split(":")[0]
        assert uid.isdigit() and int(uid) != 0, "a numeric, non-root user (runAsNonRoot can check it)"
        copies = [rest for kw, rest in stages[final] if kw == "COPY"]
        assert copies and all(c.startswith("--from=") for c in copies), "final stages copy only build output"
        assert not any(kw == "RUN" for kw, _ in stages[final]), f"{final} installs nothing itself"


def test_dockerignore_keeps_secrets_and_caches_out_of_the_build_context() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "an allow-list: nothing enters the context unless named"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    for kw, rest in dockerfile_instructions():
        if kw == "COPY" and not rest.startswith("--from="):
            *sources, _dest = rest.split()
            for source in sources:
                top = source.split("/")[0]
                assert top in allowed, f"COPY {source} is excluded by .dockerignore"
                assert (ROOT / source).exists(), f"COPY {source}: missing from the repository"
    for secret in (".env", "compose", ".venv", ".git", "tests"):
        assert secret not in allowed


# -- Makefile and scripts -----------------------------------------------------------------


def run_script(
    script: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(COMPOSE_DIR / script), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        # Static mode unless a test says otherwise, whatever a developer's compose/.env says.
        env={**os.environ, "WORKER_MODE": "static", **(env or {})},
        timeout=30,
    )


def scale_plan(n: str) -> tuple[dict[str, int], list[str]]:
    result = run_script("scale-workers.sh", n, env={"COMPOSE": "echo docker compose"})
    assert result.returncode == 0, result.stderr
    command_line = result.stdout.strip().splitlines()[-1].split()
    scales = {
        arg.split("=")[0]: int(arg.split("=")[1])
        for flag, arg in itertools.pairwise(command_line)
        if flag == "--scale"
    }
    return scales, command_line


def test_scale_workers_runs_partition_services_up_to_the_partition_count(
    services: dict[str, dict[str, Any]],
) -> None:
    workers = sorted(worker_services(services))
    scales, command_line = scale_plan("2")
    assert command_line[:5] == ["docker", "compose", "up", "--detach", "--no-recreate"]
    assert scales == {"worker-0": 1, "worker-1": 1, "worker-2": 0, "worker-3": 0}
    assert command_line[-len(workers) :] == workers
    scales, _ = scale_plan("4")
    assert scales == dict.fromkeys(workers, 1)


def test_scale_workers_beyond_the_partition_count_adds_standbys() -> None:
    scales, _ = scale_plan("6")
    assert scales == {"worker-0": 2, "worker-1": 2, "worker-2": 1, "worker-3": 1}
    assert sum(scales.values()) == 6
    result = run_script("scale-workers.sh", "6", env={"COMPOSE": "echo"})
    assert "standby" in result.stdout


def test_scale_workers_partition_count_matches_compose(services: dict[str, dict[str, Any]]) -> None:
    script = (COMPOSE_DIR / "scale-workers.sh").read_text()
    (partitions,) = re.findall(r"^PARTITIONS=(\d+)$", script, re.M)
    total = {environment(s)["PARTITIONS"] for s in worker_services(services).values()}
    assert total == {partitions}


def test_scale_workers_to_zero_stops_every_worker(services: dict[str, dict[str, Any]]) -> None:
    scales, _ = scale_plan("0")
    assert scales == dict.fromkeys(worker_services(services), 0)


@pytest.mark.parametrize("bad", ["-1", "x", "", "1.5"])
def test_scale_workers_refuses_bad_counts(bad: str) -> None:
    result = run_script("scale-workers.sh", bad, env={"COMPOSE": "echo"})
    assert result.returncode == 2
    assert "usage" in result.stderr


def test_print_urls_matches_the_published_ports(services: dict[str, dict[str, Any]]) -> None:
    result = run_script("print-urls.sh", env={"ENV_FILE": str(ENV_EXAMPLE)})
    assert result.returncode == 0, result.stderr
    urls = dict(line.split(None, 1) for line in result.stdout.strip().splitlines())
    for label, service in (("Grafana", "grafana"), ("Prometheus", "prometheus"), ("Append", "api")):
        ((_, host_port, _),) = published(services[service])
        assert f"http://127.0.0.1:{host_port}/" in urls[label], (label, urls[label])
    assert ":5432/" in urls["PostgreSQL"]


def test_makefile_has_the_stack_targets() -> None:
    makefile = (ROOT / "Makefile").read_text()
    for target in ("up", "down", "ps", "logs", "scale-workers", "dashboards"):
        assert re.search(rf"^{re.escape(target)}:", makefile, re.M), target
    assert "compose/docker-compose.yml" in makefile
    assert "print-urls.sh" in makefile.split("\nup:", 1)[1].split("\n\n", 1)[0]
