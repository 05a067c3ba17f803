"""The lab's projection: the chaos suite's recorder, with a known cost per event and a poison check.

Each batch sleeps ``INCIDENT_EVENT_COST`` seconds per event before it writes,
so one worker applies at most about ``1 / cost`` events a second whatever the
machine: a hot partition and a fleet too small for the load are then a
matter of the append rate, not of how busy the shared CPU is. It sleeps
before its first write, while the batch's transaction holds no transaction
id, so a busy worker does not fence the others' reads. Loaded by the
workers as ``incidents.projection:LabRecorder``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

from tests.projections import PoisonSensitive

from projectionist.consume.projection import Tx
from projectionist.records import RecordedEvent

#: Seconds of work per event: about 125 events a second per worker.
DEFAULT_EVENT_COST = 0.008


class LabRecorder(PoisonSensitive):
    """Records every application (as ``Recorder``), fails on ``{"poison": true}`` until healed, costs time."""

    name = "recorder"

    def __init__(self) -> None:
        super().__init__()
        self.event_cost = float(os.environ.get("INCIDENT_EVENT_COST", str(DEFAULT_EVENT_COST)))

    def apply_batch(self, events: Sequence[RecordedEvent], tx: Tx) -> None:
        if self.event_cost:
            time.sleep(self.event_cost * len(events))
        super().apply_batch(events, tx)
