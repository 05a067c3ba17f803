"""PostgreSQL's own metrics: the compose stack runs a pinned community postgres_exporter and scrapes it.

The exporter's series themselves are checked against a real exporter in the
session's Prometheus stack (tests/test_dashboards.py runs every PostgreSQL
panel's query, the lock-waits custom query included).
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from tests.helpers import ROOT

COMPOSE = ROOT / "compose" / "docker-compose.yml"
PROMETHEUS = ROOT / "compose" / "prometheus.yml"
QUERIES = ROOT / "deploy" / "postgres-exporter" / "queries.yaml"


def exporter() -> dict[str, Any]:
    service: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())["services"]["postgres-exporter"]
    return service


def test_the_exporter_is_the_community_image_pinned_to_a_release() -> None:
    assert re.fullmatch(r"quay\.io/prometheuscommunity/postgres-exporter:v\d+\.\d+\.\d+", exporter()["image"])


def test_it_reads_checkpoints_of_postgresql_17_and_the_shipped_custom_query() -> None:
    service = exporter()
    assert "--collector.stat_checkpointer" in service["command"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
    (flag,) = [c for c in service["command"] if c.startswith("--extend.query-path=")]
    assert (ROOT / "compose" / mounts[flag.split("=", 1)[1]]).resolve() == QUERIES
    assert service["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    env = service["environment"]
    assert env["DATA_SOURCE_PASS"].startswith("${POSTGRES_PASSWORD:?")


def test_prometheus_scrapes_it() -> None:
    jobs = {j["job_name"]: j for j in yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"]}
    assert jobs["postgres"]["static_configs"] == [{"targets": ["postgres-exporter:9187"]}]


def test_the_custom_queries_add_only_what_the_collectors_lack() -> None:
    queries = yaml.safe_load(QUERIES.read_text())
    assert list(queries) == ["pg_locks_waiting"]
    (metric,) = queries["pg_locks_waiting"]["metrics"]
    assert metric == {"count": {"usage": "GAUGE", "description": metric["count"]["description"]}}
