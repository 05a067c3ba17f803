"""Load shape: ``LOAD_USERS`` users, each paced to ``LOAD_RATE / LOAD_USERS`` requests/s,
for ``LOAD_DURATION`` seconds.

Pacing comes from the users' ``constant_throughput`` wait time, so the offered
rate stays constant as long as the server keeps up (when it does not, each
user falls behind and the rate drops: watch the p95).
"""

from __future__ import annotations

from locust import LoadTestShape

from loadgen import LoadConfig


class ConstantRateShape(LoadTestShape):
    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.config = LoadConfig.from_env()

    def tick(self) -> tuple[int, float] | None:
        run_time: float = self.get_run_time()  # type: ignore[no-untyped-call]
        if self.config.duration and run_time >= self.config.duration:
            return None
        return self.config.users, self.config.users_spawn_rate(self.config.users)
