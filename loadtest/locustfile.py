"""HTTP load: users appending batches to random aggregates through the append API.

    locust -f loadtest/locustfile.py,loadtest/shape_constant_rate.py --headless --host http://127.0.0.1:8000

Configured by ``LOAD_*`` variables (see loadgen.LoadConfig); ``make load`` runs it for you.
"""

from __future__ import annotations

import random
from typing import Any

from locust import FastHttpUser, constant, constant_throughput, events, task

import locust_setup
from loadgen import KeyPicker, LoadConfig, append_body, traceparent

CONFIG = LoadConfig.from_env()
locust_setup.register(events)

#: The request name in Locust's stats: the route template, never the raw path.
APPEND_NAME = "/streams/{aggregate_id}/events"


class AppendUser(FastHttpUser):
    """Appends ``LOAD_BATCH_SIZE`` events per request with expected version ``any``."""

    wait_time = constant_throughput(CONFIG.user_rate) if CONFIG.user_rate > 0 else constant(0)

    def on_start(self) -> None:
        self.rng = random.Random()
        self.keys = KeyPicker(CONFIG, self.rng)
        self.headers = {"Authorization": f"Bearer {CONFIG.api_token}"} if CONFIG.api_token else {}

    @task
    def append(self) -> None:
        aggregate_id = self.keys.pick()
        headers: dict[str, Any] = dict(self.headers)
        if CONFIG.trace:
            headers["traceparent"] = traceparent(self.rng)
        with self.client.post(
            f"/streams/{aggregate_id}/events",
            json=append_body(CONFIG, self.rng, aggregate_id),
            headers=headers,
            name=APPEND_NAME,
            catch_response=True,
        ) as response:
            if response.status_code != 201:
                response.failure(f"status {response.status_code}: {(response.text or '')[:200]}")
