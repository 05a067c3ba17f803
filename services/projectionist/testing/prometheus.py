"""A real Prometheus (the ``prometheus`` binary, e.g. Debian's package) to scrape and query in tests.

:class:`Prometheus` writes a configuration into a work directory of its own,
starts the server on a free port, waits until it is ready, and answers
through the HTTP API: instant and range queries, alerts and rules.
:class:`PostgresExporter` runs the community ``postgres_exporter`` next to it.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from psycopg.conninfo import conninfo_to_dict, make_conninfo

from projectionist.store.connection import connect
from projectionist.testing.ports import free_port
from projectionist.testing.processes import ChildProcess, HarnessError, child_env
from projectionist.testing.waiting import poll_until, wait_for


def find_binary(*names: str, hint: str) -> str:
    for name in names:
        path = shutil.which(name)
        if path is not None:
            return path
    raise HarnessError(f"{' or '.join(names)} is missing: {hint}")


def prometheus_binary() -> str:
    return find_binary("prometheus", hint="`apt-get install prometheus` (.ci/run does)")


def http_get(
    url: str, *, headers: Mapping[str, str] | None = None, timeout: float = 5.0
) -> tuple[int, bytes]:
    """GET ``url``: (status, body), an HTTP error status included."""
    request = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as e:
        return int(e.code), e.read()


@dataclass(frozen=True)
class Sample:
    """One element of an instant vector."""

    labels: dict[str, str]
    value: float


@dataclass(frozen=True)
class Series:
    """One series of a range query: its labels and (unix time, value) points."""

    labels: dict[str, str]
    points: list[tuple[float, float]]


@dataclass(frozen=True)
class Alert:
    """One active alert of ``/api/v1/alerts``: ``pending`` or ``firing`` since ``active_at``."""

    name: str
    labels: dict[str, str]
    state: str
    active_at: float
    value: str

    @property
    def firing(self) -> bool:
        return self.state == "firing"


def _unix(rfc3339: str) -> float:
    # "2030-01-01T12:00:00.123456789Z": Python parses microseconds at most.
    text = rfc3339.rstrip("Z")
    head, _, fraction = text.partition(".")
    stamp = datetime.fromisoformat(head + "+00:00").timestamp()
    return stamp + (float(f"0.{fraction}") if fraction else 0.0)


class Prometheus:
    """One Prometheus server over ``config`` (a dict, written as JSON, which is YAML).

    Build, :meth:`start`, query, and always :meth:`stop`. ``flags`` are added to
    the command line (``--enable-feature=exemplar-storage`` is always on).
    """

    def __init__(
        self, workdir: Path, config: Mapping[str, Any], *, flags: Sequence[str] = (), name: str = "prometheus"
    ) -> None:
        self.workdir = workdir
        self.config_path = workdir / "prometheus.yml"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"{name}.log"
        self.name = name
        self._flags = list(flags)
        self._child: ChildProcess | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        self.write_config(config)

    # -- lifecycle ---------------------------------------------------------

    def write_config(self, config: Mapping[str, Any]) -> None:
        self.config_path.write_text(json.dumps(config, indent=2))

    def read_config(self) -> dict[str, Any]:
        config: dict[str, Any] = json.loads(self.config_path.read_text())
        return config

    def start(self, timeout: float = 60.0) -> None:
        self._child = ChildProcess(
            self.name,
            [
                prometheus_binary(),
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--enable-feature=exemplar-storage",
                "--log.level=warn",
                *self._flags,
            ],
            env=child_env(),
            log_path=self.log_path,
        )

        def ready() -> bool:
            if not self.alive():
                raise HarnessError(f"{self.name} exited:\n{self.log_tail()}")
            try:
                return http_get(f"{self.url}/-/ready", timeout=1)[0] == 200
            except OSError:
                return False

        wait_for(ready, f"{self.name} to become ready", timeout=timeout, interval=0.2)

    def alive(self) -> bool:
        return self._child is not None and self._child.alive()

    def reload(self) -> None:
        """Re-read the configuration file (SIGHUP), e.g. after :meth:`write_config`."""
        if self._child is None or not self._child.alive():
            raise HarnessError(f"{self.name} is not running")
        self._child.send(signal.SIGHUP)

    def stop(self, timeout: float = 15.0) -> None:
        if self._child is not None:
            self._child.stop(timeout=timeout)
            self._child = None

    def log_tail(self, limit: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-limit:] if self.log_path.exists() else ""

    # -- the HTTP API ------------------------------------------------------

    def api(self, path: str, **params: str) -> Any:
        """GET ``/api/v1/<path>`` and return its ``data``; raises on an API error."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        status, body = http_get(url, timeout=30)
        payload = json.loads(body)
        if status != 200 or payload.get("status") != "success":
            raise AssertionError(f"Prometheus API {path} {params} failed ({status}): {payload}")
        return payload["data"]

    def query(self, promql: str, at: float | None = None) -> list[Sample]:
        """An instant query; a scalar result comes back as one sample without labels."""
        params = {"query": promql} if at is None else {"query": promql, "time": f"{at:.3f}"}
        data = self.api("query", **params)
        if data["resultType"] == "vector":
            return [Sample(r["metric"], float(r["value"][1])) for r in data["result"]]
        if data["resultType"] == "scalar":
            return [Sample({}, float(data["result"][1]))]
        raise AssertionError(f"unexpected result type {data['resultType']} for {promql}")

    def value(self, promql: str) -> float | None:
        """The single sample's value, or ``None`` for an empty result."""
        result = self.query(promql)
        if len(result) > 1:
            raise AssertionError(f"{promql} returned {len(result)} samples: {result}")
        return result[0].value if result else None

    def query_range(self, promql: str, start: float, end: float, step: float) -> list[Series]:
        data = self.api("query_range", query=promql, start=f"{start:.3f}", end=f"{end:.3f}", step=f"{step:g}")
        return [Series(r["metric"], [(float(t), float(v)) for t, v in r["values"]]) for r in data["result"]]

    def alerts(self) -> list[Alert]:
        return [
            Alert(
                name=a["labels"].get("alertname", ""),
                labels=dict(a["labels"]),
                state=a["state"],
                active_at=_unix(a["activeAt"]),
                value=str(a.get("value", "")),
            )
            for a in self.api("alerts")["alerts"]
        ]

    def rules(self) -> list[dict[str, Any]]:
        """Every loaded rule (alerting and recording), with its health and last error."""
        return [rule for group in self.api("rules")["groups"] for rule in group["rules"]]

    def wait_until(
        self,
        promql: str,
        condition: Callable[[list[Sample]], bool],
        *,
        what: str,
        timeout: float = 30.0,
        check: Callable[[], None] | None = None,
    ) -> list[Sample]:
        """Poll ``promql`` until ``condition(result)`` holds; fail with the last result after ``timeout``.

        ``check`` runs before each query and may raise to end the wait early
        (a worker that died, say).
        """
        result: list[Sample] = []

        def holds() -> bool:
            nonlocal result
            if check is not None:
                check()
            if not self.alive():
                raise AssertionError(f"{self.name} exited:\n{self.log_tail()}")
            result = self.query(promql)
            return condition(result)

        if poll_until(holds, timeout, interval=0.5) is None:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}: {promql} = {result}")
        return result


def exporter_binary() -> str:
    return find_binary(
        "postgres_exporter",
        "prometheus-postgres-exporter",
        hint="`apt-get install prometheus-postgres-exporter` (.ci/run does)",
    )


class PostgresExporter:
    """The community postgres_exporter, watching the server of ``database_url``, on a free port.

    ``queries`` is a custom-queries file (``--extend.query-path``);
    ``flags`` are added to its command line.
    """

    def __init__(
        self,
        database_url: str,
        log_path: Path,
        *,
        queries: Path | None = None,
        flags: Sequence[str] = (),
    ) -> None:
        params = conninfo_to_dict(database_url)
        params.setdefault("sslmode", "disable")
        # The exporter's lib/pq reads a URL; make_conninfo writes key=value, which it reads too.
        self.dsn = make_conninfo(**params)  # type: ignore[arg-type]
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.log_path = log_path
        self._args = [f"--web.listen-address={self.target}", "--log.level=warn", *flags]
        if queries is not None:
            self._args.append(f"--extend.query-path={queries}")
        self._child: ChildProcess | None = None

    def start(self, timeout: float = 30.0) -> None:
        self._child = ChildProcess(
            "postgres-exporter",
            [exporter_binary(), *self._args],
            env=child_env({"DATA_SOURCE_NAME": self.dsn}),
            log_path=self.log_path,
        )

        def answers() -> bool:
            assert self._child is not None
            if not self._child.alive():
                raise HarnessError(f"postgres_exporter exited:\n{self._child.output()}")
            try:
                return http_get(f"http://{self.target}/", timeout=1)[0] == 200
            except OSError:
                return False

        wait_for(answers, "postgres_exporter to listen", timeout=timeout, interval=0.2)

    def stop(self) -> None:
        if self._child is not None:
            self._child.stop(timeout=10)
            self._child = None


#: The series of the exporter's ``stat_checkpointer`` collector (v0.16 and later), under the same
#: names, for an older exporter (Debian's is 0.11) watching PostgreSQL 17 or later, which moved
#: the checkpointer's statistics out of ``pg_stat_bgwriter``.
CHECKPOINTER_QUERIES = """
pg_stat_checkpointer:
  master: true
  query: >-
    SELECT num_timed AS num_timed_total, num_requested AS num_requested_total,
    write_time AS write_time_total, sync_time AS sync_time_total,
    buffers_written AS buffers_written_total FROM pg_stat_checkpointer
  metrics:
    - num_timed_total: {usage: COUNTER, description: Scheduled checkpoints}
    - num_requested_total: {usage: COUNTER, description: Requested checkpoints}
    - write_time_total: {usage: COUNTER, description: Time writing checkpoint files (ms)}
    - sync_time_total: {usage: COUNTER, description: Time syncing checkpoint files (ms)}
    - buffers_written_total: {usage: COUNTER, description: Buffers written by checkpoints}
"""


def exporter_setup(database_url: str, queries: Path, workdir: Path) -> tuple[Path, list[str]]:
    """The queries file and flags that make this machine's exporter serve what the dashboards read.

    A current exporter gets ``--collector.stat_checkpointer``. An exporter
    too old for it, watching PostgreSQL 17 or later, gets the same series
    from :data:`CHECKPOINTER_QUERIES`, added to ``queries`` in a copy in
    ``workdir``, and its ``bgwriter`` collector off (it reads the columns
    PostgreSQL 17 moved, and fails every scrape).
    """
    with connect(database_url, autocommit=True) as conn:
        row = conn.execute("SELECT current_setting('server_version_num')::int").fetchone()
    server = int(row[0]) if row else 0
    found = subprocess.run([exporter_binary(), "--help"], capture_output=True, text=True, timeout=30)
    help_text = found.stdout + found.stderr
    text = queries.read_text()
    flags: list[str] = []
    if "collector.stat_checkpointer" in help_text:
        flags.append("--collector.stat_checkpointer")
    elif server >= 170000:
        text += CHECKPOINTER_QUERIES
        flags.append("--no-collector.bgwriter")
    combined = workdir / "postgres-exporter-queries.yaml"
    workdir.mkdir(parents=True, exist_ok=True)
    combined.write_text(text)
    return combined, flags
