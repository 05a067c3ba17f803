"""Dashboards as code: the committed JSON is what the code generates, and it is well-formed for Grafana 12.

No Grafana server is needed: the JSON is checked structurally, and every
PromQL expression (dashboards and alert rules) is executed against the real
Prometheus of tests/fix_prometheus.py, with ``$__rate_interval`` and the
template variables substituted by real values.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from dashboards import generate, rules
from dashboards import workers as workers_module
from dashboards.common import PROVISIONED_UIDS, REFRESH_INTERVALS

from projectionist.testing import (
    ChildProcess,
    child_env,
    free_port,
    poll_until,
    projectionist_command,
    wait_for,
)
from tests.fix_prometheus import PrometheusStack, Sample, http_get
from tests.helpers import ROOT

DASHBOARD_DIR = ROOT / "compose" / "grafana" / "dashboards"
PROVISIONING = ROOT / "compose" / "grafana" / "provisioning"
GRID_WIDTH = 24

# A 12-style dashboard: panels Grafana 12 still renders (no Angular graph/singlestat).
ALLOWED_PANEL_TYPES = {"row", "timeseries", "stat", "state-timeline", "table", "bargauge", "gauge"}


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DASHBOARD_DIR / name).read_text())
    return data


def dashboards() -> list[str]:
    return sorted(generate.DASHBOARDS)


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, rows' nested panels included."""
    out: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def datasource_refs(node: Any) -> Iterator[dict[str, Any]]:
    """Every {"type": ..., "uid": ...} data source reference anywhere in the JSON."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource" and isinstance(value, dict):
                yield value
            else:
                yield from datasource_refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from datasource_refs(item)


def provisioned_datasources() -> dict[str, dict[str, Any]]:
    config = yaml.safe_load((PROVISIONING / "datasources" / "datasources.yml").read_text())
    return {ds["uid"]: ds for ds in config["datasources"]}


# -- generation ----------------------------------------------------------------


def test_committed_json_is_what_the_code_generates() -> None:
    rendered = generate.render_all()
    assert sorted(p.name for p in DASHBOARD_DIR.glob("*.json")) == sorted(rendered), (
        "compose/grafana/dashboards holds a JSON file no builder generates (or misses one)"
    )
    for name, text in rendered.items():
        assert (DASHBOARD_DIR / name).read_text() == text, f"{name} is stale: run `make dashboards`"


def test_check_mode_reports_a_stale_file(tmp_path: Path) -> None:
    assert generate.main(["--output-dir", str(tmp_path)]) == 0
    assert generate.main(["--check", "--output-dir", str(tmp_path)]) == 0
    victim = tmp_path / dashboards()[0]
    victim.write_text(victim.read_text().replace('"refresh": "10s"', '"refresh": "1m"'))
    assert generate.main(["--check", "--output-dir", str(tmp_path)]) == 1


def test_generation_is_deterministic() -> None:
    assert generate.render_all() == generate.render_all()


def test_sdk_version_is_pinned_to_the_grafana_12_build() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"grafana-foundation-sdk==1769699241"' in pyproject
    from importlib.metadata import version

    assert version("grafana-foundation-sdk") == "1769699241"


# -- structure -----------------------------------------------------------------


@pytest.mark.parametrize("name", dashboards())
def test_dashboard_identity_time_and_refresh(name: str) -> None:
    d = load(name)
    assert d["uid"] and len(d["uid"]) <= 40
    assert d["title"] and d["description"]
    assert d["time"] == {"from": "now-1h", "to": "now"}
    assert d["refresh"] in REFRESH_INTERVALS
    assert d["timepicker"]["refresh_intervals"] == REFRESH_INTERVALS
    assert d["schemaVersion"] >= 39  # Grafana 11/12 schema, not the pre-5 rows/span layout
    assert "rows" not in d


def test_dashboard_uids_are_unique() -> None:
    uids = [load(name)["uid"] for name in dashboards()]
    assert len(set(uids)) == len(uids)


@pytest.mark.parametrize("name", dashboards())
def test_panel_ids_are_unique_and_types_render_in_grafana_12(name: str) -> None:
    all_panels = panels(load(name))
    ids = [p["id"] for p in all_panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {ids}"
    for p in all_panels:
        assert p["type"] in ALLOWED_PANEL_TYPES, f"{p.get('title')}: panel type {p['type']}"


def grid_problems(all_panels: list[dict[str, Any]]) -> list[str]:
    """Panels outside the 24-column grid, and pairs of panels that overlap."""
    problems = []
    boxes = []
    for p in all_panels:
        g = p["gridPos"]
        if g["w"] <= 0 or g["h"] <= 0 or g["x"] < 0 or g["y"] < 0 or g["x"] + g["w"] > GRID_WIDTH:
            problems.append(f"{p['title']!r} is outside the grid: {g}")
        boxes.append((p["title"], g["x"], g["y"], g["x"] + g["w"], g["y"] + g["h"]))
    for i, (title_a, ax0, ay0, ax1, ay1) in enumerate(boxes):
        for title_b, bx0, by0, bx1, by1 in boxes[i + 1 :]:
            if ax0 < bx1 and bx0 < ax1 and ay0 < by1 and by0 < ay1:
                problems.append(f"{title_a!r} and {title_b!r} overlap")
    return problems


@pytest.mark.parametrize("name", dashboards())
def test_grid_positions_fit_and_do_not_overlap(name: str) -> None:
    assert grid_problems(panels(load(name))) == []


def test_grid_check_catches_overlaps_and_overflow() -> None:
    def panel(title: str, x: int, y: int, w: int, h: int) -> dict[str, Any]:
        return {"title": title, "gridPos": {"x": x, "y": y, "w": w, "h": h}}

    assert grid_problems([panel("a", 0, 0, 12, 8), panel("b", 12, 0, 12, 8), panel("c", 0, 8, 24, 1)]) == []
    assert grid_problems([panel("a", 0, 0, 12, 8), panel("b", 6, 4, 12, 8)]) == ["'a' and 'b' overlap"]
    assert grid_problems([panel("wide", 20, 0, 8, 8)]) == [
        "'wide' is outside the grid: " + str({"x": 20, "y": 0, "w": 8, "h": 8})
    ]


@pytest.mark.parametrize("name", dashboards())
def test_every_panel_has_a_title_description_unit_and_queries(name: str) -> None:
    for p in panels(load(name)):
        if p["type"] == "row":
            continue
        assert p.get("title"), p
        assert p.get("description", "").strip(), f"{p['title']}: no description"
        unit = p.get("fieldConfig", {}).get("defaults", {}).get("unit")
        assert unit, f"{p['title']}: no unit"
        targets = p.get("targets", [])
        assert targets, f"{p['title']}: no queries"
        ref_ids = [t["refId"] for t in targets]
        assert len(ref_ids) == len(set(ref_ids)), f"{p['title']}: duplicate refIds"
        for t in targets:
            assert t.get("expr", "").strip(), f"{p['title']}: empty expression"


@pytest.mark.parametrize("name", dashboards())
def test_datasource_uids_match_the_provisioned_ones(name: str) -> None:
    d = load(name)
    provisioned = provisioned_datasources()
    assert set(PROVISIONED_UIDS) == set(provisioned)
    variables = {v["name"]: v for v in d["templating"]["list"]}
    ds_var = variables["datasource"]
    assert ds_var["type"] == "datasource" and ds_var["query"] == "prometheus"
    assert ds_var["current"]["value"] in provisioned
    assert provisioned[ds_var["current"]["value"]]["type"] == "prometheus"
    refs = list(datasource_refs(d))
    assert refs
    for ref in refs:
        assert ref["uid"] == "${datasource}" or ref["uid"] in provisioned, ref
        if ref["uid"] in provisioned:
            assert provisioned[ref["uid"]]["type"] == ref["type"], ref


def test_worker_dashboard_has_datasource_projection_and_worker_variables() -> None:
    d = load("projection-workers.json")
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert list(variables) == ["datasource", "projection", "worker"]
    for name in ("projection", "worker"):
        v = variables[name]
        assert v["type"] == "query"
        assert v["query"].startswith("label_values(")
        assert v["includeAll"] and v["multi"] and v["allValue"] == ".*"
    assert "$projection" in variables["worker"]["query"], "worker choices follow the projection"


def test_every_worker_panel_honours_the_projection_variable() -> None:
    for p in panels(load("projection-workers.json")):
        for t in p.get("targets", []):
            expr = t["expr"]
            # The store-wide gauge, the join on up, PostgreSQL's own series and the
            # objective's constants have no projection label of their own.
            if any(
                name in expr
                for name in (
                    "projectionist_oldest_transaction_age_seconds",
                    "head_position",
                    "pg_",
                    "projectionist:freshness_objective:ratio",
                    "projectionist:freshness_threshold:seconds",
                )
            ):
                continue
            assert "$projection" in expr, f"{p['title']}: {expr}"


def test_worker_dashboard_has_every_required_panel() -> None:
    titles = {p["title"] for p in panels(load("projection-workers.json"))}
    for wanted in (
        "Lag in events per worker",
        "Lag in seconds per worker",
        "Events/s per worker",
        "Events/s in total",
        "Up",
        "Worker state",
        "Time since last progress",
        "Partition coverage",
        "Batch duration percentiles",
        "Errors by type",
        "Oldest open transaction",
        "Metrics connection pool",
    ):
        assert wanted in titles


def test_batch_duration_panel_asks_for_exemplars() -> None:
    (panel,) = [
        p for p in panels(load("projection-workers.json")) if p["title"] == "Batch duration percentiles"
    ]
    assert all(t["exemplar"] for t in panel["targets"])
    assert all("projectionist_batch_duration_seconds_bucket" in t["expr"] for t in panel["targets"])


def test_lag_is_deduplicated_with_max_not_summed() -> None:
    """Every process reports every partition's lag, so a sum would count it once per process."""
    for name in dashboards():
        for p in panels(load(name)):
            for t in p.get("targets", []):
                if "projectionist_lag_" in t["expr"]:
                    assert "sum" not in t["expr"], f"{p['title']}: {t['expr']}"


def test_event_store_dashboard_queries_every_required_metric() -> None:
    exprs = " ".join(
        t["expr"] for p in panels(load("event-store-and-load.json")) for t in p.get("targets", [])
    )
    for metric in (
        "projectionist_events_appended_total",
        "projectionist_http_requests_total",
        "projectionist_http_request_duration_seconds_bucket",
        "locust_users",
        "locust_request_duration_seconds_bucket",
        "projectionist_head_position",
    ):
        assert metric in exprs


# -- provisioning ----------------------------------------------------------------


def test_prometheus_datasource_links_exemplars_to_the_trace_datasource() -> None:
    ds = provisioned_datasources()
    prometheus = ds["prometheus"]
    assert prometheus["url"] == "http://prometheus:9090"
    (link,) = prometheus["jsonData"]["exemplarTraceIdDestinations"]
    # The worker's exemplar label (metrics.py: exemplar={"trace_id": ...}).
    assert link["name"] == "trace_id"
    assert link["datasourceUid"] == "tempo" and ds["tempo"]["type"] == "tempo"
    assert ds["tempo"]["url"] == "http://tempo:3200"
    metrics_source = (ROOT / "services" / "projectionist" / "telemetry" / "metrics.py").read_text()
    assert 'exemplar={"trace_id": trace_id}' in metrics_source


def test_dashboard_provider_reads_the_folder_compose_mounts() -> None:
    provider = yaml.safe_load((PROVISIONING / "dashboards" / "dashboards.yml").read_text())
    (p,) = provider["providers"]
    assert p["type"] == "file"
    compose = yaml.safe_load((ROOT / "compose" / "docker-compose.yml").read_text())
    mounts = {v.split(":")[1]: v.split(":")[0] for v in compose["services"]["grafana"]["volumes"] if ":" in v}
    assert mounts[p["options"]["path"]] == "./grafana/dashboards"
    assert (ROOT / "compose" / mounts["/etc/grafana/provisioning"]).resolve() == PROVISIONING
    home = compose["services"]["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(p["options"]["path"] + "/")
    assert (DASHBOARD_DIR / home.rsplit("/", 1)[1]).exists()


# -- every expression, executed against real Prometheus ----------------------------------------
#
# The shared ``prometheus_stack`` (tests/fix_prometheus.py) runs real workers
# under load and a real Prometheus with the shipped alert rules. The append
# API's and Locust's series come from a real ``projectionist api`` process and
# a real headless Locust run (loadtest/locustfile.py) against it, which this
# module starts and adds to that Prometheus's scrape configuration (restored
# afterwards).

RULES_DIR = ROOT / "deploy" / "prometheus" / "rules"
API_JOB = "dashboards-api"
LOCUST_JOB = "dashboards-locust"
ELASTIC_JOB = "dashboards-elastic-worker"
# Wait for series to appear (a fresh stack has scraped only a few times), not a timing assertion.
DATA_DEADLINE = 90.0

_LABEL_VALUES = re.compile(r"^label_values\((?P<expr>.*),\s*(?P<label>\w+)\)$", re.S)


def label_values_promql(query: str) -> tuple[str, str]:
    """Grafana's ``label_values(expr, label)`` as the PromQL that lists the same values."""
    m = _LABEL_VALUES.match(query.strip())
    assert m, f"not a label_values() query: {query}"
    return f"group by ({m.group('label')}) ({m.group('expr')})", m.group("label")


def substitute(expr: str, values: dict[str, str], rate_interval: str) -> str:
    for name, value in values.items():
        expr = expr.replace(f"${{{name}}}", value).replace(f"${name}", value)
    expr = expr.replace("$__rate_interval", rate_interval)
    assert "$" not in expr, f"unsubstituted variable in {expr}"
    return expr


def targets_of(name: str) -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in panels(load(name)) for t in p.get("targets", [])]


def rule_expressions() -> list[tuple[str, str]]:
    """(alert or record name, expression) of every rule of every shipped rule file."""
    return [(rule.get("alert") or rule["record"], rule["expr"]) for _, rule in rules.rules(RULES_DIR)]


# A series selector: a metric name this project exports (or up), optionally with
# matchers; a label name inside a matcher (name="...") is not one.
_SELECTOR = re.compile(
    r'\b(?P<name>up|projectionist_[a-z_]+|pg_[a-z_]+)\b(?!\s*(?:=~|!~|!=|=)\s*")(?P<matchers>\{[^}]*\})?'
)


def selectors(expr: str) -> set[str]:
    return {m.group("name") + (m.group("matchers") or "") for m in _SELECTOR.finditer(expr)}


def test_selector_extraction() -> None:
    expr = 'max by (p) (projectionist_lag_events{a="1"}) > 0 and on (p) up == 0 unless x{projectionist_y="z"}'
    assert selectors(expr) == {'projectionist_lag_events{a="1"}', "up"}


class DashboardQueries:
    """The stack plus the API process, and the values the template variables take."""

    def __init__(self, stack: PrometheusStack, api_port: int) -> None:
        self.stack = stack
        self.api_port = api_port
        scrape_seconds = float(_scrape_interval(stack).rstrip("s"))
        # Grafana's floor for $__rate_interval is four scrape intervals.
        self.rate_interval = f"{max(4 * scrape_seconds, 4):g}s"

    def wait_for_data(self, promql: str, what: str) -> list[Sample]:
        return self.stack.wait_until(promql, lambda r: len(r) > 0, what=what, timeout=DATA_DEADLINE)

    def variable_values(self, dashboard: dict[str, Any], *, all_values: bool) -> dict[str, str]:
        values = {"datasource": PROVISIONED_UIDS[0]}
        for variable in dashboard["templating"]["list"]:
            if variable["type"] != "query":
                continue
            if all_values:
                values[variable["name"]] = variable["allValue"]
                continue
            promql, label = label_values_promql(substitute(variable["query"], values, self.rate_interval))
            result = self.wait_for_data(promql, f"values of ${variable['name']}")
            values[variable["name"]] = sorted(s.labels[label] for s in result)[0]
        return values


def _scrape_interval(stack: PrometheusStack) -> str:
    config = yaml.safe_load((stack.workdir / "prometheus.yml").read_text())
    return str(config["global"]["scrape_interval"])


def _add_scrape_jobs(stack: PrometheusStack, jobs: dict[str, str]) -> str:
    """Add scrape jobs (name -> target) to the running Prometheus: rewrite its config, SIGHUP.

    Returns the original config, for the caller to restore.
    """
    path = stack.workdir / "prometheus.yml"
    original = path.read_text()
    config = yaml.safe_load(original)
    for job, target in jobs.items():
        config["scrape_configs"].append({"job_name": job, "static_configs": [{"targets": [target]}]})
    path.write_text(json.dumps(config, indent=2))
    stack.reload()
    return original


@pytest.fixture(scope="module")
def dashboard_queries(
    prometheus_stack: PrometheusStack, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DashboardQueries]:
    stack = prometheus_stack
    port = free_port()
    log_path = tmp_path_factory.mktemp("api") / "api.log"
    env = {k: v for k, v in os.environ.items() if k not in ("WORKER_ID", "TOTAL_WORKERS", "API_TOKEN")}
    env.update(stack.worker_env())
    env.update(
        {"DATABASE_URL": stack.db_url, "OTEL_SERVICE_NAME": "projectionist-api", "PYTHONUNBUFFERED": "1"}
    )
    with log_path.open("ab") as log_file:
        api = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "projectionist",
                "api",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--no-migrate",
            ],
            env=env,
            cwd=ROOT,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    original_config: str | None = None
    locust: subprocess.Popen[bytes] | None = None
    elastic: ChildProcess | None = None
    try:
        base = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            assert api.poll() is None, f"the API exited:\n{log_path.read_text()[-3000:]}"
            try:
                return http_get(f"{base}/readyz", timeout=1)[0] == 200
            except OSError:
                return False

        assert poll_until(ready, timeout=60, interval=0.2) is not None, (
            f"the API did not become ready:\n{log_path.read_text()[-3000:]}"
        )
        # Some traffic for every API panel: appends (201), a read (200) and a 404.
        for n in range(5):
            body = json.dumps(
                {"events": [{"type": "DashboardProbe", "data": {"n": n}}], "expected_version": "any"}
            ).encode()
            request = urllib.request.Request(
                f"{base}/streams/dashboard-probe-{n}/events",
                data=body,
                headers={"Content-Type": "application/json"},
                method="POST",
            )
            with urllib.request.urlopen(request, timeout=10) as response:
                assert response.status in (200, 201)
        assert http_get(f"{base}/streams/dashboard-probe-0")[0] == 200
        assert http_get(f"{base}/streams/no-such-stream-here")[0] in (200, 404)
        # Real Locust (loadtest/locustfile.py) against that API, with its Prometheus exporter.
        locust_port = free_port()
        locust_env = {
            **env,
            "LOAD_METRICS_PORT": str(locust_port),
            "LOAD_RATE": "10",
            "LOAD_KEY_PREFIX": "dashboard-load",
        }
        with log_path.with_name("locust.log").open("ab") as log_file:
            locust = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "locust",
                    "-f",
                    "loadtest/locustfile.py",
                    "--headless",
                    "--users",
                    "2",
                    "--spawn-rate",
                    "2",
                    "--host",
                    base,
                ],
                env=locust_env,
                cwd=ROOT,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        # An elastic member of the static workers' group: they hold every partition, so it
        # owns none, but it reports the Ownership row's series (its share, the members).
        elastic_port = free_port()
        elastic = ChildProcess(
            "elastic-worker",
            projectionist_command("worker", "--elastic", "--metrics-port", str(elastic_port), "--no-migrate"),
            env=child_env({**stack.worker_env(), "DATABASE_URL": stack.db_url}, pythonpath=[ROOT]),
            log_path=log_path.with_name("elastic.log"),
            cwd=ROOT,
        )
        original_config = _add_scrape_jobs(
            stack,
            {
                API_JOB: f"127.0.0.1:{port}",
                LOCUST_JOB: f"127.0.0.1:{locust_port}",
                ELASTIC_JOB: f"127.0.0.1:{elastic_port}",
            },
        )
        stack.wait_until(
            "projectionist_group_members",
            lambda r: len(r) == 1,
            what=f"the elastic member scraped (its log: {log_path.with_name('elastic.log')})",
            timeout=60,
        )
        stack.wait_until(
            f'up{{job="{LOCUST_JOB}"}} == 1',
            lambda r: len(r) == 1,
            what=f"Locust scraped (its log: {log_path.with_name('locust.log')})",
            timeout=60,
        )
        stack.wait_until(
            f'up{{job="{API_JOB}"}} == 1', lambda r: len(r) == 1, what="the API scraped", timeout=60
        )
        yield DashboardQueries(stack, port)
    finally:
        if elastic is not None:
            elastic.stop()
            elastic.close()
        if locust is not None:
            _stop(locust)
        if original_config is not None:
            (stack.workdir / "prometheus.yml").write_text(original_config)
            stack.reload()
        _stop(api)


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.mark.integration
@pytest.mark.parametrize("all_values", [False, True], ids=["one-value", "all"])
@pytest.mark.parametrize("name", dashboards())
def test_every_dashboard_expression_returns_data(
    dashboard_queries: DashboardQueries, name: str, all_values: bool
) -> None:
    dashboard = load(name)
    values = dashboard_queries.variable_values(dashboard, all_values=all_values)
    for title, expr in targets_of(name):
        promql = substitute(expr, values, dashboard_queries.rate_interval)
        result = dashboard_queries.wait_for_data(promql, f"{name}: {title}")
        assert all(math.isfinite(s.value) or math.isnan(s.value) for s in result)


@pytest.mark.integration
def test_worker_filters_select_only_that_worker(dashboard_queries: DashboardQueries) -> None:
    dashboard = load("projection-workers.json")
    values = dashboard_queries.variable_values(dashboard, all_values=False)
    expr = substitute(workers_module.LAG_EVENTS, values, dashboard_queries.rate_interval)
    result = dashboard_queries.wait_for_data(expr, "lag of one worker")
    assert {(s.labels["projection"], s.labels["worker"]) for s in result} == {
        (values["projection"], values["worker"])
    }


@pytest.mark.integration
def test_every_alert_rule_expression_runs_and_its_series_exist(dashboard_queries: DashboardQueries) -> None:
    rules = rule_expressions()
    assert len(rules) >= 5
    for alert, expr in rules:
        dashboard_queries.stack.query(expr)  # executes without error (a healthy stack fires nothing)
        found = selectors(expr)
        # A constant, or a rule over other rules' series only.
        assert found or re.search(r"projectionist:|^vector\(", expr.strip()), (
            f"{alert}: no series selector found in {expr}"
        )
        for selector in found:
            dashboard_queries.wait_for_data(selector, f"{alert}: {selector}")


@pytest.mark.integration
def test_prometheus_evaluates_every_loaded_rule_without_error(dashboard_queries: DashboardQueries) -> None:
    expected = {alert for alert, _ in rule_expressions()}
    rules: list[dict[str, Any]] = []

    def all_evaluated() -> bool:
        rules[:] = [r for g in dashboard_queries.stack.api("rules")["groups"] for r in g["rules"]]
        evaluated = [r for r in rules if r.get("lastEvaluation", "").startswith("20")]
        return {r["name"] for r in evaluated} >= expected

    assert poll_until(all_evaluated, DATA_DEADLINE, interval=0.5) is not None, (
        f"rules not evaluated yet: {rules}"
    )
    assert {r["name"] for r in rules} == expected
    for rule in rules:
        assert rule["health"] == "ok", f"{rule['name']}: {rule.get('lastError')}"


@pytest.mark.integration
def test_batch_duration_exemplars_carry_the_trace_id_grafana_links(
    dashboard_queries: DashboardQueries,
) -> None:
    link = provisioned_datasources()["prometheus"]["jsonData"]["exemplarTraceIdDestinations"][0]["name"]
    exemplars: list[dict[str, Any]] = []

    def stored() -> bool:
        end = time.time()
        data = dashboard_queries.stack.api(
            "query_exemplars",
            query="projectionist_batch_duration_seconds_bucket",
            start=str(end - 300),
            end=str(end),
        )
        exemplars[:] = [e for series in data for e in series["exemplars"]]
        return bool(exemplars)

    wait_for(stored, "exemplars stored for the batch duration histogram", DATA_DEADLINE, interval=0.5)
    for exemplar in exemplars:
        assert re.fullmatch(r"[0-9a-f]{32}", exemplar["labels"][link]), exemplar


def _expressions(name: str, title: str) -> dict[str, str]:
    """The panel's expressions by legend, with the variables set to match everything."""
    (panel,) = [p for p in panels(load(name)) if p["title"] == title]
    values = {"projection": ".*", "worker": ".*"}
    return {t["legendFormat"].split(" ")[0]: substitute(t["expr"], values, "5m") for t in panel["targets"]}


# In an outage (nothing live, nothing owned) the counts must still have a
# series, or their lines vanish; with no traffic the ratios must not be 0/0 = NaN.
def test_idle_and_outage_panels_show_zero_or_nothing_not_gaps_or_nan(tmp_path: Path) -> None:
    coverage = _expressions("projection-workers.json", "Partition coverage")
    batch = _expressions("projection-workers.json", "Batch size")
    ratio = _expressions("event-store-and-load.json", "API error ratio")
    labels = 'projection="orders", worker="0", total_workers="1"'
    state = "projectionist_worker_state"
    tests = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {
                        "series": f'projectionist_worker_state{{{labels}, {state}="live"}}',
                        "values": "0x10",
                    },
                    {"series": f"projectionist_partition_owned{{{labels}}}", "values": "0x10"},
                    {"series": f"projectionist_batch_size_sum{{{labels}}}", "values": "40x10"},
                    {"series": f"projectionist_batch_size_count{{{labels}}}", "values": "4x10"},
                    {
                        "series": 'projectionist_http_requests_total{route="/x", status="201"}',
                        "values": "7x10",
                    },
                ],
                "promql_expr_test": [
                    {
                        "expr": coverage["live"],
                        "eval_time": "10m",
                        "exp_samples": [{"labels": '{projection="orders"}', "value": 0}],
                    },
                    {
                        "expr": coverage["owned"],
                        "eval_time": "10m",
                        "exp_samples": [{"labels": '{projection="orders"}', "value": 0}],
                    },
                    {"expr": batch["mean"], "eval_time": "10m", "exp_samples": []},
                    {"expr": ratio["5xx"], "eval_time": "10m", "exp_samples": []},
                ],
            }
        ],
    }
    path = tmp_path / "panels.test.yml"
    path.write_text(json.dumps(tests))
    binary = shutil.which("promtool")
    assert binary is not None, "promtool is missing: `apt-get install prometheus` (.ci/run does)"
    result = subprocess.run([binary, "test", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
