"""Polling until a condition holds, for code that watches threads and processes work."""

from __future__ import annotations

import time
from collections.abc import Callable


class WaitTimeout(AssertionError):
    """A :func:`wait_for` condition did not hold in time (an assertion failure in a test)."""


def poll_until(predicate: Callable[[], object], timeout: float, interval: float = 0.05) -> float | None:
    """Poll ``predicate`` until it is truthy; the monotonic time it was, or ``None`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return time.monotonic()
        if time.monotonic() > deadline:
            return None
        time.sleep(interval)


def wait_for(
    predicate: Callable[[], object], what: str = "the condition", timeout: float = 30, interval: float = 0.05
) -> float:
    """:func:`poll_until`, raising :class:`WaitTimeout` naming ``what`` when it times out."""
    at = poll_until(predicate, timeout, interval)
    if at is None:
        raise WaitTimeout(f"timed out after {timeout:g} s waiting for {what}")
    return at
