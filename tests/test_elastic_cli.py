"""Elastic mode's settings and command line: WORKER_MODE, --elastic, its partition count, and status."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from projectionist.errors import ConfigError
from projectionist.settings import DEFAULT_ELASTIC_PARTITIONS, Settings, WorkerMode
from projectionist.testing import ChildProcess, child_env, projectionist_command, wait_for
from tests.helpers import ROOT, run_cli


def test_worker_mode_elastic_needs_no_worker_id_and_defaults_to_its_own_partition_count() -> None:
    settings = Settings.from_env({"WORKER_MODE": "Elastic"})
    assert (settings.worker_mode, settings.worker_id) == (WorkerMode.ELASTIC, None)
    assert settings.partitions == DEFAULT_ELASTIC_PARTITIONS
    assert Settings.from_env({"WORKER_MODE": "elastic", "PARTITIONS": "64"}).partitions == 64
    # The flag is the same setting.
    assert Settings.from_env({}, worker_mode=WorkerMode.ELASTIC).partitions == DEFAULT_ELASTIC_PARTITIONS
    assert Settings.from_env({}).worker_mode is WorkerMode.STATIC
    assert Settings.from_env({"REBALANCE_INTERVAL": "0.25"}).worker.rebalance_interval == 0.25


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"WORKER_MODE": "elastic", "WORKER_ID": "2"}, "WORKER_ID=2 is set, but an elastic worker"),
        ({"WORKER_MODE": "dynamic"}, "WORKER_MODE='dynamic' must be 'static' or 'elastic'"),
        ({"REBALANCE_INTERVAL": "0"}, "REBALANCE_INTERVAL='0' must be a finite number greater than 0"),
    ],
)
def test_elastic_settings_that_cannot_work_are_config_errors(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)


def test_worker_elastic_with_a_worker_id_exits_2_naming_it() -> None:
    result = run_cli("worker", "--elastic", "--worker-id", "1", env={"DATABASE_URL": "postgresql://unused"})
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "projectionist: error: WORKER_ID=1 is set, but an elastic worker (WORKER_MODE=elastic or --elastic) "
        "takes its partitions itself: unset WORKER_ID"
    ]


def test_the_worker_help_names_elastic_mode() -> None:
    text = run_cli("worker", "--help").stdout
    assert "--elastic" in text and "WORKER_MODE" in text and "REBALANCE_INTERVAL" in text


@pytest.mark.integration
@pytest.mark.slow
def test_two_elastic_worker_processes_show_in_status(db_url: str, tmp_path: Path) -> None:
    run_cli("append", "--count", "500", "--aggregates", "40", db_url=db_url)
    env = child_env({"DATABASE_URL": db_url}, drop_tracing=True, pythonpath=[ROOT])
    procs = [
        ChildProcess(
            f"elastic-{i}",
            projectionist_command(
                "worker", "--elastic", "--partitions", "6", "--projection", "tests.projections:Recorder"
            ),
            env=env,
            log_path=tmp_path / f"elastic-{i}.log",
            cwd=ROOT,
        )
        for i in range(2)
    ]
    try:

        def shares() -> list[int]:
            data = json.loads(run_cli("status", "--json", db_url=db_url).stdout)
            group = data["projections"].get("recorder", {})
            return sorted(len(m["owned"]) for m in group.get("members", []))

        wait_for(lambda: shares() == [3, 3], "two members with 3 partitions each", timeout=60)
        data = json.loads(run_cli("status", "--json", db_url=db_url).stdout)["projections"]["recorder"]
        assert data["total_workers"] == 6 and data["moving"] == 0 and data["unowned"] == []
        assert all(m["target"] == 3 and m["name"] for m in data["members"])
        text = run_cli("status", db_url=db_url).stdout
        assert "2 elastic member(s) of 6 partitions" in text and "no move in progress" in text
        procs[0].kill9()
        started = time.monotonic()
        wait_for(lambda: shares() == [6], "the survivor owning all 6", timeout=30)
        print(f"re-owned {time.monotonic() - started:.2f} s after kill -9 (status polled)")
    finally:
        for proc in procs:
            proc.stop()
            proc.close()
