"""Worker state changes in the log, so an operator reading logs sees catching up, live, failing."""

from __future__ import annotations

import logging

from projectionist.hooks import Membership, WorkerHooks, WorkerInfo, WorkerState

log = logging.getLogger("projectionist.worker")


class LoggingHooks(WorkerHooks):
    """Logs each state change, at WARNING for failing and standby.

    An elastic worker's partitions come and go as members join and leave,
    and the worker logs each move itself: their other state changes are
    DEBUG, and only a failing partition is a WARNING.
    """

    def __init__(self) -> None:
        self._elastic: set[str] = set()

    def on_membership(self, membership: Membership) -> None:
        self._elastic.add(membership.projection)

    def on_state(self, info: WorkerInfo, state: WorkerState, reason: str) -> None:
        level = logging.WARNING if state in (WorkerState.FAILING, WorkerState.STANDBY) else logging.INFO
        if info.projection in self._elastic and state is not WorkerState.FAILING:
            level = logging.DEBUG
        log.log(
            level,
            "%s worker %d/%d is %s (%s)",
            info.projection,
            info.worker_id,
            info.total_workers,
            state.value,
            reason,
        )
