"""Polling until a condition holds, for tests that watch threads and processes work."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_for(
    predicate: Callable[[], object], what: str = "the condition", timeout: float = 30, interval: float = 0.05
) -> float:
    """Poll ``predicate`` until it is truthy; return the monotonic time it was; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout:g} s waiting for {what}"
        time.sleep(interval)
    return time.monotonic()
