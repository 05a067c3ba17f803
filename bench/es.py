"""The Python ``eventsourcing`` library (9.5.x, PostgreSQL persistence), used as its docs show.

Appends go through ``Application.save`` of real aggregates, so its table lock,
pipelined inserts and NOTIFY are all in the measurement. Catch-up reads the
notification log with ``recorder.select_notifications`` and turns each
notification into a domain event with ``app.mapper.to_domain_event``, which is
what its own projection runner does per event: the counterpart of
projectionist decoding rows into ``RecordedEvent``.

Each aggregate's ``Created`` event is saved before the clock starts, so timed
appends write the same number of events as everyone else's; the ``Created``
events stay in the table and are counted when catch-up reads them.
"""

from __future__ import annotations

import time
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from psycopg.conninfo import conninfo_to_dict

from bench.contestants import Contestant, Unavailable, Writer
from bench.data import (
    PEER_CHECKPOINT_DDL,
    PEER_CHECKPOINT_SAVE,
    READ_MODEL_DDL,
    READ_MODEL_UPSERT,
    Event,
    coalesce,
)

try:
    from eventsourcing.application import Application
    from eventsourcing.domain import Aggregate, event

    IMPORT_ERROR: str | None = None
except ImportError as e:  # the bench extra is not installed
    IMPORT_ERROR = f"eventsourcing is not installed ({e}); pip install -e '.[bench]'"


if IMPORT_ERROR is None:

    class BenchAccount(Aggregate):
        def __init__(self, name: str) -> None:
            self.name = name

        @staticmethod
        def create_id(name: str) -> UUID:
            return uuid5(NAMESPACE_URL, name)

        @event("Recorded")
        def record(self, payload: dict[str, Any]) -> None:
            """The event carries the payload; the aggregate keeps no state from it."""

    class BenchApp(Application[UUID]):
        """Its events live in ``benchapp_events`` (the library names tables after the app)."""


class _EsWriter(Writer):
    def __init__(self, es: EventSourcing, events: list[Event]) -> None:
        self.es = es
        # Aggregates are created (and their Created events saved) before the clock starts.
        self.aggregates = es.ensure_aggregates(sorted({agg for agg, _ in events}))

    def write(self, aggregate: str, body: dict[str, Any]) -> None:
        agg = self.aggregates[aggregate]
        agg.record(payload=body)
        self.es.app.save(agg)


class EventSourcing(Contestant):
    key = "eventsourcing"
    label = "eventsourcing 9.5"

    def __init__(self, url: str) -> None:
        super().__init__(url)
        if IMPORT_ERROR is not None:
            raise Unavailable(IMPORT_ERROR)
        params = conninfo_to_dict(url)
        self.env = {
            "PERSISTENCE_MODULE": "eventsourcing.postgres",
            "POSTGRES_DBNAME": str(params.get("dbname", "postgres")),
            "POSTGRES_HOST": str(params.get("host", "127.0.0.1")),
            "POSTGRES_PORT": str(params.get("port", "5432")),
            "POSTGRES_USER": str(params.get("user", "postgres")),
            "POSTGRES_PASSWORD": str(params.get("password", "unused-with-trust-auth")),
            # Enough connections for the 8 concurrent writers.
            "POSTGRES_POOL_SIZE": "8",
            "POSTGRES_MAX_OVERFLOW": "4",
        }
        self.app: Any = None
        self.aggregates: dict[str, Any] = {}

    def setup(self) -> None:
        self.app = BenchApp(env=self.env)
        with self.connect() as conn:
            conn.execute(READ_MODEL_DDL)
            conn.execute(PEER_CHECKPOINT_DDL)

    def events_table(self) -> str:
        recorder = self.app.recorder
        return f'"{recorder.datastore.schema or "public"}"."{recorder.events_table_name}"'

    def reset(self) -> None:
        with self.connect() as conn:
            conn.execute(
                f"TRUNCATE {self.events_table()}, bench_read_model, bench_checkpoint RESTART IDENTITY"
            )
        self.aggregates = {}

    def ensure_aggregates(self, names: list[str]) -> dict[str, Any]:
        new = [BenchAccount(name) for name in names if name not in self.aggregates]
        for i in range(0, len(new), 100):
            self.app.save(*new[i : i + 100])
        for agg in new:
            self.aggregates[agg.name] = agg
        return {name: self.aggregates[name] for name in names}

    def append_batches(self, transactions: list[list[Event]]) -> float:
        self.ensure_aggregates(sorted({agg for txn in transactions for agg, _ in txn}))
        aggregates = self.aggregates
        started = time.perf_counter()
        for txn in transactions:
            touched: dict[str, Any] = {}
            for name, body in txn:
                agg = aggregates[name]
                agg.record(payload=body)
                touched[name] = agg
            # One save of all touched aggregates is one transaction.
            self.app.save(*touched.values())
        return time.perf_counter() - started

    def writer(self, thread: int, events: list[Event]) -> Writer:
        return _EsWriter(self, events)

    def catch_up(self, *, read_model: bool, batch_size: int, name: str) -> tuple[int, float]:
        recorder = self.app.recorder
        to_domain_event = self.app.mapper.to_domain_event
        with self.connect() as conn:
            started = time.perf_counter()
            position = 0
            total = 0
            while True:
                notifications = recorder.select_notifications(
                    start=position, limit=batch_size, inclusive_of_start=False
                )
                if not notifications:
                    break
                events = [to_domain_event(n) for n in notifications]
                if read_model:
                    # The library's recorder owns its pool; the read model and its
                    # checkpoint commit together on our own connection.
                    rows = [(str(e.originator_id), n.id) for e, n in zip(events, notifications, strict=True)]
                    with conn.transaction():
                        with conn.cursor() as cur:
                            cur.executemany(READ_MODEL_UPSERT, coalesce(rows))
                        conn.execute(PEER_CHECKPOINT_SAVE, (name, notifications[-1].id))
                total += len(events)
                position = notifications[-1].id
            return total, time.perf_counter() - started

    def close(self) -> None:
        if self.app is not None:
            self.app.close()
