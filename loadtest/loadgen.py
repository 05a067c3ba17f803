"""What the Locust users send, and when a run counts as failed. Imports no Locust, so tests can use it.

Everything is configured from the environment (``LOAD_*``), parsed once into
:class:`LoadConfig`; the locustfiles and load shapes read the same object.
"""

from __future__ import annotations

import bisect
import itertools
import math
import os
import random
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

DISTRIBUTIONS = ("uniform", "zipf")


class LoadConfigError(ValueError):
    """A ``LOAD_*`` variable is invalid; the message names it."""


def _int(env: Mapping[str, str], name: str, default: int, low: int = 1) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise LoadConfigError(f"{name}={raw!r} is not an integer") from None
    if value < low:
        raise LoadConfigError(f"{name}={raw!r} must be at least {low}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, low: float = 0.0) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise LoadConfigError(f"{name}={raw!r} is not a number") from None
    if not math.isfinite(value) or value < low:
        raise LoadConfigError(f"{name}={raw!r} must be a number >= {low}")
    return value


@dataclass(frozen=True, slots=True)
class LoadConfig:
    """The load a run generates. The README's section "Load tests: make load" lists every variable."""

    #: Number of distinct aggregates (``LOAD_KEYS``).
    keys: int = 1000
    #: ``uniform`` or ``zipf`` (``LOAD_DISTRIBUTION``): hot keys make partitions uneven.
    distribution: str = "uniform"
    #: Zipf exponent (``LOAD_ZIPF_S``): key of rank r is picked with weight 1 / r**s.
    zipf_s: float = 1.1
    #: Events per request (``LOAD_BATCH_SIZE``).
    batch_size: int = 10
    #: Aggregate ids are ``<prefix>-<n>`` (``LOAD_KEY_PREFIX``).
    key_prefix: str = "load"
    event_type: str = "LoadEvent"
    #: Users at full load (``LOAD_USERS``).
    users: int = 10
    #: Requests per second of all ``users`` together (``LOAD_RATE``); 0 = as fast as they can.
    rate: float = 0.0
    #: Seconds the load shapes run (``LOAD_DURATION``); 0 = until stopped.
    duration: float = 60.0
    #: Users added per step, and seconds per step, of the step ramp.
    step_users: int = 2
    step_seconds: float = 10.0
    #: Users started per second (``LOAD_SPAWN_RATE``); 0 = all at once.
    spawn_rate: float = 0.0
    #: Send a fresh W3C ``traceparent`` with every request (``LOAD_TRACE=1``).
    trace: bool = False
    #: For the API's bearer auth (``LOAD_API_TOKEN``, else ``API_TOKEN``).
    api_token: str | None = None
    #: The direct-database user's target (``LOAD_DATABASE_URL``, else ``DATABASE_URL``).
    database_url: str | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.distribution not in DISTRIBUTIONS:
            raise LoadConfigError(
                f"LOAD_DISTRIBUTION={self.distribution!r} must be one of {', '.join(DISTRIBUTIONS)}"
            )
        if self.zipf_s <= 0:
            raise LoadConfigError(f"LOAD_ZIPF_S={self.zipf_s} must be greater than 0")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> LoadConfig:
        env = os.environ if environ is None else environ
        d = cls()  # the defaults
        return cls(
            keys=_int(env, "LOAD_KEYS", d.keys),
            distribution=env.get("LOAD_DISTRIBUTION", "").strip().lower() or d.distribution,
            zipf_s=_float(env, "LOAD_ZIPF_S", d.zipf_s),
            batch_size=_int(env, "LOAD_BATCH_SIZE", d.batch_size),
            key_prefix=env.get("LOAD_KEY_PREFIX", "").strip() or d.key_prefix,
            event_type=env.get("LOAD_EVENT_TYPE", "").strip() or d.event_type,
            users=_int(env, "LOAD_USERS", d.users),
            rate=_float(env, "LOAD_RATE", d.rate),
            duration=_float(env, "LOAD_DURATION", d.duration),
            step_users=_int(env, "LOAD_STEP_USERS", d.step_users),
            step_seconds=_float(env, "LOAD_STEP_SECONDS", d.step_seconds, low=0.1),
            spawn_rate=_float(env, "LOAD_SPAWN_RATE", d.spawn_rate),
            trace=env.get("LOAD_TRACE", "").strip().lower() in ("1", "true", "yes", "on"),
            api_token=env.get("LOAD_API_TOKEN") or env.get("API_TOKEN") or None,
            database_url=env.get("LOAD_DATABASE_URL") or env.get("DATABASE_URL") or None,
            # A typo must not silently mean "unseeded": the run would not repeat.
            seed=_int(env, "LOAD_SEED", 0, low=-(2**63)) if env.get("LOAD_SEED", "").strip() else None,
        )

    @property
    def user_rate(self) -> float:
        """Requests per second of one user (0 = no pacing): ``LOAD_RATE`` shared by ``LOAD_USERS``."""
        return self.rate / self.users if self.rate > 0 else 0.0

    def users_spawn_rate(self, users: int) -> float:
        return self.spawn_rate if self.spawn_rate > 0 else float(max(users, 1))


class KeyPicker:
    """Draws aggregate ids: uniform over ``keys`` ids, or Zipf-skewed towards the first ranks.

    With Zipf, a few hot aggregates get most events; since an aggregate always
    lands on the same partition, that is what makes one worker busier than the
    others.
    """

    def __init__(self, config: LoadConfig, rng: random.Random | None = None) -> None:
        self.config = config
        self.rng = rng or random.Random(config.seed)
        self._cumulative: list[float] | None = None
        if config.distribution == "zipf":
            weights = (1.0 / (rank**config.zipf_s) for rank in range(1, config.keys + 1))
            self._cumulative = list(itertools.accumulate(weights))

    def index(self) -> int:
        if self._cumulative is None:
            return self.rng.randrange(self.config.keys)
        point = self.rng.random() * self._cumulative[-1]
        return min(bisect.bisect_right(self._cumulative, point), self.config.keys - 1)

    def pick(self) -> str:
        return f"{self.config.key_prefix}-{self.index()}"


def step_users(run_time: float, step_users: int, step_seconds: float, max_users: int) -> int:
    """Users of the step ramp at ``run_time`` seconds: one more step every ``step_seconds``."""
    return min(step_users * (1 + int(run_time // step_seconds)), max_users)


def payload(rng: random.Random, aggregate_id: str) -> dict[str, Any]:
    """About 200 bytes of JSON, like the sample events the demo appends."""
    return {
        "aggregate": aggregate_id,
        "amount": rng.randint(1, 10_000),
        "currency": "EUR",
        "note": "load test event " + "x" * rng.randint(100, 140),
    }


def append_body(config: LoadConfig, rng: random.Random, aggregate_id: str) -> dict[str, Any]:
    """A ``POST /streams/{aggregate_id}/events`` body of ``batch_size`` events."""
    return {
        "events": [
            {"type": config.event_type, "data": payload(rng, aggregate_id)} for _ in range(config.batch_size)
        ],
        "expected_version": "any",
    }


def traceparent(rng: random.Random) -> str:
    """A new sampled W3C trace context, as if each request came from a separate caller."""
    return f"00-{uuid.UUID(int=rng.getrandbits(128)).hex}-{rng.getrandbits(64):016x}-01"


@dataclass(frozen=True, slots=True)
class Verdict:
    """Whether a run stayed within its thresholds, and why not."""

    requests: int
    failures: int
    p95_ms: float
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def error_ratio(self) -> float:
        return self.failures / self.requests if self.requests else 0.0


def judge(
    requests: int,
    failures: int,
    p95_ms: float,
    *,
    max_error_ratio: float,
    max_p95_ms: float,
    min_requests: int = 1,
    exceptions: int = 0,
) -> Verdict:
    """Compare a run's totals with the thresholds; a run that sent too few requests fails too,
    and so does one whose users raised unhandled exceptions (Locust's own rule for exit 1)."""
    problems: list[str] = []
    if exceptions:
        problems.append(f"users raised {exceptions} unhandled exceptions")
    ratio = failures / requests if requests else 0.0
    if requests < min_requests:
        problems.append(f"only {requests} requests were made (at least {min_requests} required)")
    if ratio > max_error_ratio:
        problems.append(f"error ratio {ratio:.2%} is above the {max_error_ratio:.2%} threshold")
    if p95_ms > max_p95_ms:
        problems.append(f"p95 latency {p95_ms:.0f} ms is above the {max_p95_ms:.0f} ms threshold")
    return Verdict(requests, failures, p95_ms, tuple(problems))
