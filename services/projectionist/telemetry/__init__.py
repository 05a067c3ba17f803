"""What a worker process serves and exports: metrics, the lag Collector, health, traces and logs.

Every part is a hook on the worker's seam (:mod:`projectionist.hooks`); the
processing loop never imports anything from here.
"""

from __future__ import annotations

from projectionist.telemetry._telemetry import Telemetry, build_hooks
from projectionist.telemetry.logs import LoggingHooks

__all__ = ["LoggingHooks", "Telemetry", "build_hooks"]
