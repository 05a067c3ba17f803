"""The autoscaling experiment's knobs (``python -m experiments.autoscale``), shared with its report."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DATABASE = "projectionist_autoscale"


@dataclass(frozen=True, slots=True)
class Options:
    """The experiment's knobs; minutes are scaled minutes (real seconds = minutes x 60 / scale)."""

    #: 5: the autoscaler's windows shrink fivefold; a worker process still takes its real second
    #: or two to start and join, which a larger scale would make look slow.
    scale: float = 5.0
    base_rate: float = 25.0
    step_rate: float = 200.0
    base_minutes: float = 2.0
    step_minutes: float = 12.0
    after_minutes: float = 10.0
    #: Seconds each event waits on the slow service.
    cost: float = 0.02
    batch_size: int = 20
    aggregates: int = 480
    partitions: int = 16
    database: str = DATABASE
    out: Path = Path("out/autoscale-experiment")
    publish: bool = False

    def seconds(self, minutes: float) -> float:
        return minutes * 60.0 / self.scale
