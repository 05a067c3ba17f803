"""One backoff policy, shared by every retry: reconnects now, poison-event retries later."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Exponential backoff with full jitter, capped at ``maximum`` seconds.

    Call :meth:`next_delay` after each failure and :meth:`reset` after a success.
    ``max_attempts`` (``None`` = unlimited) bounds :meth:`exhausted`.
    """

    initial: float = 0.1
    maximum: float = 10.0
    multiplier: float = 2.0
    jitter: float = 0.5
    max_attempts: int | None = None
    attempts: int = field(default=0, init=False)
    _rng: random.Random = field(default_factory=random.Random, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.initial <= 0 or self.maximum < self.initial:
            raise ValueError("Backoff needs 0 < initial <= maximum")
        if not 0 <= self.jitter <= 1:
            raise ValueError("Backoff jitter must be within [0, 1]")

    def next_delay(self) -> float:
        try:
            growth = self.multiplier**self.attempts
        except OverflowError:
            # Over a thousand failures in a row (hours of a database outage at
            # the cap): the delay has long been the maximum, and must not
            # become an exception in the loop that waits it out.
            growth = math.inf
        base = min(self.maximum, self.initial * growth)
        self.attempts += 1
        # Jitter spreads out workers that all lost the database at the same moment.
        return base * (1 - self.jitter * self._rng.random())

    def exhausted(self) -> bool:
        return self.max_attempts is not None and self.attempts >= self.max_attempts

    def reset(self) -> None:
        self.attempts = 0
