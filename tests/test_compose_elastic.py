"""Compose in elastic mode (compose/docker-compose.elastic.yml): one scalable worker service.

Validated without a Docker engine, as tests/test_compose.py does: the override
against the Compose Specification, the merged stack's workers, and what
``make scale-workers N=...`` runs in elastic mode.
"""

from __future__ import annotations

import itertools
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from projectionist.settings import Settings, WorkerMode
from tests.helpers import ROOT
from tests.test_compose import (
    COMPOSE_DIR,
    ENV_EXAMPLE,
    check_compose_schema,
    command,
    environment,
    interpolate,
    read_env_file,
    run_script,
    variables_used,
)

OVERRIDE = COMPOSE_DIR / "docker-compose.elastic.yml"


@pytest.fixture(scope="module")
def override() -> dict[str, Any]:
    data: dict[str, Any] = interpolate(yaml.safe_load(OVERRIDE.read_text()), read_env_file(ENV_EXAMPLE))
    return data


@pytest.fixture(scope="module")
def base() -> dict[str, Any]:
    data: dict[str, Any] = interpolate(
        yaml.safe_load((COMPOSE_DIR / "docker-compose.yml").read_text()), read_env_file(ENV_EXAMPLE)
    )
    return data


def test_the_override_matches_the_compose_specification(override: dict[str, Any], tmp_path: Path) -> None:
    interpolated = tmp_path / "docker-compose.elastic.yml"
    interpolated.write_text(yaml.safe_dump(override, sort_keys=False))
    for path in (OVERRIDE, interpolated):
        result = check_compose_schema(path)
        assert result.returncode == 0, f"{path}:\n{result.stdout}{result.stderr}"


def test_every_variable_of_the_override_is_documented_in_env_example() -> None:
    documented = read_env_file(ENV_EXAMPLE)
    assert variables_used(OVERRIDE.read_text()) <= set(documented)
    assert documented["WORKER_MODE"] == "static"


def test_elastic_mode_runs_one_scalable_service_instead_of_one_per_partition(
    base: dict[str, Any], override: dict[str, Any]
) -> None:
    services = override["services"]
    statics = [n for n, s in base["services"].items() if command(s)[:2] == ["projectionist", "worker"]]
    assert len(statics) == 4
    for name in statics:
        assert services[name] == {"deploy": {"replicas": 0}}, name
    elastic = services["worker-elastic"]
    assert command(elastic) == ["projectionist", "worker", "--elastic"]
    env = environment(elastic)
    assert "WORKER_ID" not in env
    settings = Settings.from_env({"PARTITIONS": env["PARTITIONS"]}, worker_mode=WorkerMode.ELASTIC)
    assert settings.partitions == int(read_env_file(ENV_EXAMPLE)["ELASTIC_PARTITIONS"])
    assert int(elastic["deploy"]["replicas"]) == int(read_env_file(ENV_EXAMPLE)["ELASTIC_WORKERS"])
    assert "container_name" not in elastic and "ports" not in elastic, "several processes run behind it"
    # The same settings a static worker gets, but WORKER_ID and the partition count.
    static_env = environment(base["services"]["worker-0"])
    assert {
        k: v for k, v in static_env.items() if k not in ("WORKER_ID", "PARTITIONS", "OTEL_SERVICE_NAME")
    } == {k: v for k, v in env.items() if k not in ("PARTITIONS", "OTEL_SERVICE_NAME")}
    assert elastic["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert "127.0.0.1:9100/healthz" in " ".join(elastic["healthcheck"]["test"])
    assert elastic["stop_grace_period"]
    # migrate builds the partition indexes of the elastic group's count.
    assert command(services["migrate"]) == ["projectionist", "migrate", "--partitions", env["PARTITIONS"]]


def _plan(n: str, **env: str) -> tuple[dict[str, int], list[str], str]:
    result = run_script("scale-workers.sh", n, env={"COMPOSE": "echo docker compose", **env})
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip().splitlines()[-1].split()
    scales = {a.split("=")[0]: int(a.split("=")[1]) for f, a in itertools.pairwise(line) if f == "--scale"}
    return scales, line, result.stdout


def test_scale_workers_in_elastic_mode_sets_one_replica_count() -> None:
    for n in ("0", "3", "9"):
        scales, line, out = _plan(n, WORKER_MODE="elastic")
        assert scales == {
            "worker-0": 0,
            "worker-1": 0,
            "worker-2": 0,
            "worker-3": 0,
            "worker-elastic": int(n),
        }
        assert line[-1] == "worker-elastic" and "--no-recreate" in line
        assert "share the group's partitions" in out


def test_scale_workers_reads_the_mode_from_the_env_file(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("WORKER_MODE=elastic\n")
    result = subprocess.run(
        ["sh", str(COMPOSE_DIR / "scale-workers.sh"), "2"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "ENV_FILE": str(env_file), "COMPOSE": "echo"},
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert "--scale worker-elastic=2" in result.stdout
    bad = run_script("scale-workers.sh", "2", env={"WORKER_MODE": "dynamic", "COMPOSE": "echo"})
    assert bad.returncode == 2 and "static or elastic" in bad.stderr


def test_the_makefile_adds_the_override_in_elastic_mode() -> None:
    makefile = (ROOT / "Makefile").read_text()
    block = makefile.split("ifeq ($(WORKER_MODE),elastic)", 1)[1].split("endif", 1)[0]
    assert "-f compose/docker-compose.elastic.yml" in block
    assert re.search(r'WORKER_MODE="\$\(WORKER_MODE\)" \./compose/scale-workers\.sh', makefile)
