"""What a worker process serves and exports: metrics, the lag Collector, health, traces and logs.

Every part is a hook on the worker's seam (:mod:`projectionist.hooks`);
the processing loop never imports anything from here.
"""

from __future__ import annotations

from projectionist.telemetry._telemetry import (
    LoggingHooks,
    Telemetry,
    TelemetryOptions,
    build_hooks,
    build_telemetry,
)

__all__ = ["LoggingHooks", "Telemetry", "TelemetryOptions", "build_hooks", "build_telemetry"]
