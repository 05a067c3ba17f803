"""Worker state changes in the log, so an operator reading logs sees catching up, live, failing."""

from __future__ import annotations

import logging

from projectionist.hooks import WorkerHooks, WorkerInfo, WorkerState

log = logging.getLogger("projectionist.worker")


class LoggingHooks(WorkerHooks):
    """Logs each state change, at WARNING for failing and standby."""

    def on_state(self, info: WorkerInfo, state: WorkerState, reason: str) -> None:
        level = logging.WARNING if state in (WorkerState.FAILING, WorkerState.STANDBY) else logging.INFO
        log.log(
            level,
            "%s worker %d/%d is %s (%s)",
            info.projection,
            info.worker_id,
            info.total_workers,
            state.value,
            reason,
        )
