"""The collector settings of worker and API processes."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from projectionist.worker.gc_tuning import YOUNG_THRESHOLD, tune_for_throughput


@pytest.fixture
def restore_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("restore_gc")
def test_tuning_freezes_the_start_up_heap_and_raises_the_young_threshold() -> None:
    older = gc.get_threshold()[1:]
    tune_for_throughput()
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == (YOUNG_THRESHOLD, *older)
    # Cycles are still collected.
    collected = []

    class Node:
        def __del__(self) -> None:
            collected.append(1)

    a, b = Node(), Node()
    a.other, b.other = b, a  # type: ignore[attr-defined]
    del a, b
    gc.collect()
    assert collected == [1, 1]


@pytest.mark.usefixtures("restore_gc")
def test_the_api_tunes_the_collector_before_it_serves(monkeypatch: pytest.MonkeyPatch) -> None:
    from projectionist.api import ApiSettings
    from projectionist.api import server as server_module

    seen: dict[str, int] = {}

    class Server:
        def run(self) -> None:
            seen["threshold"] = gc.get_threshold()[0]
            seen["frozen"] = gc.get_freeze_count()

    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.setattr(server_module, "_server", lambda config: Server())
    gc.unfreeze()
    server_module.serve("postgresql://127.0.0.1:1/unused", ApiSettings())
    assert seen["threshold"] == YOUNG_THRESHOLD
    assert seen["frozen"] > 0
