"""The autoscaling experiment's projection: the demo's read model, behind a slow service.

Each event costs a wait of ``SLOW_SERVICE_SECONDS`` (default 0.02), as a call
to a slow service would: the worker holds no CPU meanwhile. On a 2-core
machine, more worker processes add capacity only for work of that kind; a
projection that computes would be bound by the cores, whatever the replica
count. The wait comes first and the writes last, so a batch's transaction
takes its transaction id (which holds back every gap-safe reader) only for
its final moments.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

from projectionist.consume.projection import Tx
from projectionist.demo.sample_projection import ScalableProjection
from projectionist.records import RecordedEvent

#: Seconds each event waits on the "service".
DEFAULT_COST = 0.02


class SlowService(ScalableProjection):
    """The sample projection (same name and read model), waiting ``SLOW_SERVICE_SECONDS`` per event."""

    def __init__(self, name: str | None = None) -> None:
        super().__init__(name)
        self.cost = float(os.environ.get("SLOW_SERVICE_SECONDS", DEFAULT_COST))

    def apply_batch(self, events: Sequence[RecordedEvent], tx: Tx) -> None:
        time.sleep(self.cost * len(events))
        super().apply_batch(events, tx)
