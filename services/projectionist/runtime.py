"""Assembles a worker process's hooks from its settings (logging now; metrics and traces plug in here)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from projectionist.hooks import HookChain, WorkerHooks, WorkerInfo, WorkerState
from projectionist.settings import Settings

log = logging.getLogger("projectionist.worker")


class LoggingHooks(WorkerHooks):
    """Logs state changes, so an operator reading logs sees catching-up, live, failing."""

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


def build_hooks(settings: Settings, projections: Sequence[str]) -> HookChain:
    return HookChain([LoggingHooks()])
