"""The README's user projection works as documented, from the CLI and embedded in Python."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from projectionist import NewEvent, Partition, Worker, append
from projectionist.consume.projection import load_projection
from projectionist.store.connection import connect
from projectionist.testing import poll_until
from tests.helpers import ROOT

pytestmark = pytest.mark.integration

#: The read model once both orders' events are applied: (order, items, total in cents).
_EXPECTED = [("order-1", 2, 350), ("order-2", 1, 999)]


def _totals(db_url: str) -> list[tuple[str, int, int]]:
    with connect(db_url, autocommit=True) as conn:
        if not conn.execute("SELECT to_regclass('order_totals') IS NOT NULL").fetchone()[0]:  # type: ignore[index]
            return []
        return [(r[0], r[1], r[2]) for r in conn.execute("SELECT * FROM order_totals ORDER BY 1")]


def _add_items(db_url: str) -> None:
    with connect(db_url, autocommit=True) as conn:
        append(conn, "order-1", [NewEvent("ItemAdded", {"price_cents": 250})] * 1)
        append(conn, "order-1", [NewEvent("ItemAdded", {"price_cents": 100})])
        append(conn, "order-2", [NewEvent("ItemAdded", {"price_cents": 999}), NewEvent("Shipped", {})])


def test_user_projection_from_the_cli(db_url: str) -> None:
    _add_items(db_url)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "projectionist",
            "worker",
            "--worker-id",
            "0",
            "--projection",
            "examples.order_totals:OrderTotals",
        ],
        cwd=ROOT,
        env={"DATABASE_URL": db_url, "PATH": "/usr/bin:/bin"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        settled = poll_until(lambda: _totals(db_url) == _EXPECTED, timeout=30, interval=0.1)
        assert settled is not None, _totals(db_url)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out


def test_user_projection_embedded_in_python(db_url: str) -> None:
    _add_items(db_url)
    worker = Worker(db_url, load_projection("examples.order_totals:OrderTotals"), Partition(0, 1))
    worker.start()  # a background thread; worker.run() would block instead
    try:
        settled = poll_until(lambda: _totals(db_url) == _EXPECTED, timeout=30, interval=0.1)
        assert settled is not None, _totals(db_url)
    finally:
        worker.stop()
        worker.join(timeout=10)


def test_the_sample_projections_former_path_still_loads() -> None:
    # Deployed PROJECTION settings name it; the documented path is projectionist.demo:ScalableProjection.
    old = load_projection("projectionist.sample:ScalableProjection")
    new = load_projection("projectionist.demo:ScalableProjection")
    assert type(old) is type(new) and old.name == "scalable_projection"
