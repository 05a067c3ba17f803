"""Load shape: start with ``LOAD_STEP_USERS`` users and add as many every ``LOAD_STEP_SECONDS``,
up to ``LOAD_USERS``; hold there until ``LOAD_DURATION`` s have passed.

With ``LOAD_RATE`` set each user is paced, so the offered rate climbs in steps;
without it each user goes as fast as it can, which finds the knee of the curve.
"""

from __future__ import annotations

from locust import LoadTestShape

from loadgen import LoadConfig, step_users


class StepRampShape(LoadTestShape):
    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.config = LoadConfig.from_env()

    def tick(self) -> tuple[int, float] | None:
        run_time = self.get_run_time()  # type: ignore[no-untyped-call]
        c = self.config
        if c.duration and run_time >= c.duration:
            return None
        users = step_users(run_time, c.step_users, c.step_seconds, c.users)
        return users, c.users_spawn_rate(c.step_users)
