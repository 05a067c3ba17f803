"""Exclusive ownership and hot standby with real processes.

Two ``python -m projectionist worker`` processes run with the same WORKER_ID,
each with its own metrics port. The second one must wait as a standby, say
so in ``/readyz`` and in ``projectionist_worker_state``, apply nothing, and
take over within 5 seconds when the owner is killed with SIGKILL, while an
append load runs. No event may be applied twice or lost across the takeover.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from chaos.checks import Db
from chaos.load import Load
from prometheus_client.parser import text_string_to_metric_families

from projectionist.testing import free_port, wait_for
from tests.fix_prometheus import http_get
from tests.helpers import ROOT, run_cli

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: The standby takes over within 5 s of the owner's session dying.
TAKEOVER_LIMIT = 5.0


class WorkerProc:
    """``python -m projectionist worker`` for partition 0/1, with its own metrics port and log file."""

    def __init__(self, db_url: str, log: Path) -> None:
        self.port = free_port()
        self.log = log
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("WORKER_ID", "TOTAL_WORKERS", "METRICS_PORT", "PROJECTION")
            and not k.startswith("OTEL_")
        }
        # A batch sleeps 20 ms inside its transaction: the kill lands mid-batch more often than not.
        env.update(DATABASE_URL=db_url, WORKER_ID="0", TOTAL_WORKERS="1", RECORDER_SLEEP="0.02")
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    *(sys.executable, "-m", "projectionist", "worker"),
                    *("--projection", "tests.projections:Recorder", "--batch-size", "50"),
                    *("--poll-interval", "0.5", "--metrics-port", str(self.port), "--no-migrate"),
                ],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def readyz(self) -> tuple[int, dict[str, object]] | None:
        try:
            status, body = http_get(f"http://127.0.0.1:{self.port}/readyz", timeout=3)
        except OSError:
            return None
        return status, json.loads(body)

    def state(self) -> str | None:
        answer = self.readyz()
        if answer is None:
            return None
        workers = answer[1]["workers"]
        assert isinstance(workers, list)
        return str(workers[0]["state"])

    def metric(self, name: str, **labels: str) -> float | None:
        _, text = http_get(f"http://127.0.0.1:{self.port}/metrics")
        wanted = {"projection": "recorder", "worker": "0", "total_workers": "1", **labels}
        for family in text_string_to_metric_families(text.decode()):
            for sample in family.samples:
                if sample.name == name and wanted.items() <= sample.labels.items():
                    return float(sample.value)
        return None

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def processes(db_url: str, tmp_path: Path) -> Iterator[Callable[[str], WorkerProc]]:
    started: list[WorkerProc] = []

    def start(name: str) -> WorkerProc:
        worker = WorkerProc(db_url, tmp_path / f"{name}.log")
        started.append(worker)
        return worker

    try:
        yield start
    finally:
        for w in started:
            if w.proc.poll() is None:
                w.proc.kill()
                w.proc.wait()


def test_same_worker_id_waits_as_standby_and_takes_over_within_5s_of_kill_9(
    db_url: str, tmp_path: Path
) -> None:
    load = Load(db_url, rate=300, aggregates=20, seed=6)
    db = Db(db_url)
    with processes(db_url, tmp_path) as start:
        owner = start("owner")
        wait_for(lambda: owner.state() in ("catching_up", "live"), "the owner to be ready", 60)
        load.start()
        standby = start("standby")
        wait_for(lambda: standby.state() == "standby", "the second process to stand by", 60)

        # The standby says so everywhere: /readyz, its metrics, its log.
        answer = standby.readyz()
        assert answer is not None
        status, body = answer
        assert status == 503, body
        assert body["reason"] == "recorder 0/1 is standby (another process owns this partition)"
        assert standby.metric("projectionist_worker_state", projectionist_worker_state="standby") == 1
        assert standby.metric("projectionist_partition_owned") == 0
        assert owner.metric("projectionist_partition_owned") == 1
        assert "waiting as standby" in standby.output()
        assert owner.readyz() is not None and owner.readyz()[0] == 200  # type: ignore[index]
        # `projectionist status` shows the partition owned (live) by exactly one session.
        listing = run_cli("status", "--json", db_url=db_url)
        assert listing.returncode == 0, listing.stderr
        workers = json.loads(listing.stdout)["projections"]["recorder"]["workers"]
        assert [(w["worker_id"], w["live"]) for w in workers] == [(0, True)]
        owner_session = db.owners("recorder", 1)
        assert list(owner_session) == [0]

        # The standby applies nothing while the owner runs.
        wait_for(lambda: db.applied("recorder") > 300, "the owner to apply events under load")
        time.sleep(1.0)
        assert standby.metric("projectionist_events_processed_total") == 0

        killed_at = time.monotonic()
        owner.proc.send_signal(signal.SIGKILL)
        owner.proc.wait(timeout=10)
        took_over = wait_for(
            lambda: (
                standby.state() in ("catching_up", "live")
                and db.owners("recorder", 1).get(0) not in (None, owner_session[0])
            ),
            "the standby to take over",
            timeout=30,
        )
        takeover = took_over - killed_at
        assert takeover < TAKEOVER_LIMIT, f"takeover took {takeover:.2f} s"
        assert "took over partition ownership" in standby.output()

        # It processes the load from the owner's last committed checkpoint on.
        applied = db.applied("recorder")
        wait_for(lambda: db.applied("recorder") > applied + 100, "the new owner to apply new events")
        assert (standby.metric("projectionist_events_processed_total") or 0) > 0
        assert standby.readyz() is not None and standby.readyz()[0] == 200  # type: ignore[index]

        load.stop()
        wait_for(lambda: db.unapplied("recorder") == 0, "the new owner to catch up", 60)
        time.sleep(0.5)  # a double application, if any, would land now
        standby.proc.send_signal(signal.SIGTERM)
        assert standby.proc.wait(timeout=30) == 0, standby.output()[-3000:]
    try:
        fold = db.fold("recorder")
        processed = db.scalar(
            "SELECT events_processed FROM projection_checkpoints WHERE projection_name = 'recorder'"
        )
    finally:
        db.close()
    assert (fold.lost, fold.duplicated, fold.misordered, fold.wrong_worker) == (0, 0, 0, 0), fold
    assert fold.events > 500
    assert processed == fold.events
