"""Direct-database load: users appending through projectionist.store.appending, no API in between.

    LOAD_DATABASE_URL=postgresql://... \
        locust -f loadtest/locustfile_db.py,loadtest/shape_constant_rate.py --headless

Each user holds one psycopg connection in autocommit mode, so every append is
its own committed transaction. (Locust's contrib PostgresUser never commits.)
psycopg 3 cooperates with gevent's monkey-patching, so users do not block each other.
"""

from __future__ import annotations

import contextlib
import random
import time

import psycopg
from locust import User, constant, constant_throughput, events, task

import locust_setup
from loadgen import KeyPicker, LoadConfig, payload
from projectionist.records import ANY, NewEvent
from projectionist.store.appending import append

CONFIG = LoadConfig.from_env()
locust_setup.register(events)


class DatabaseUser(User):
    """Appends ``LOAD_BATCH_SIZE`` events per transaction, reported to Locust as ``DB append``."""

    wait_time = constant_throughput(CONFIG.user_rate) if CONFIG.user_rate > 0 else constant(0)

    def on_start(self) -> None:
        if not CONFIG.database_url:
            raise RuntimeError("set LOAD_DATABASE_URL (or DATABASE_URL) for the database user")
        self.rng = random.Random()
        self.keys = KeyPicker(CONFIG, self.rng)
        self.conn = psycopg.connect(CONFIG.database_url, autocommit=True, application_name="locust-db-user")

    def on_stop(self) -> None:
        self.conn.close()

    @task
    def append(self) -> None:
        aggregate_id = self.keys.pick()
        batch = [
            NewEvent(CONFIG.event_type, payload(self.rng, aggregate_id)) for _ in range(CONFIG.batch_size)
        ]
        started = time.perf_counter()
        error: BaseException | None = None
        try:
            append(self.conn, aggregate_id, batch, expected_version=ANY)
        except Exception as e:  # reported to Locust as a failed request
            error = e
        self.environment.events.request.fire(
            request_type="DB",
            name="append",
            response_time=(time.perf_counter() - started) * 1000.0,
            response_length=len(batch),
            exception=error,
            context={},
        )
        if error is not None and (self.conn.closed or self.conn.broken):
            # A reconnect that fails too must not escape the task: the append
            # was already counted as failed, and the next one tries again.
            with contextlib.suppress(psycopg.Error):
                self.conn = psycopg.connect(
                    CONFIG.database_url or "", autocommit=True, application_name="locust-db-user"
                )
