"""projectionist through its public API: ``append_many``/``append`` and the worker's ``Processor``.

Appends use the defaults, ``expected_version=ANY`` (what ``projectionist append``
and the demo do) and ``notify=None`` (a NOTIFY only while a worker sleeps),
unless ``exact_versions`` is set: then each append passes the stream's known
version, as an application that loaded the aggregate would. With
``notify_per_append`` set, every append sends NOTIFY in its transaction
(``notify=True``, the explicit opt-in).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from bench.contestants import Contestant, Writer
from bench.data import EVENT_TYPE, READ_MODEL_DDL, Event, grouped
from bench.projections import NoopProjection, ReadModelProjection
from projectionist.consume.processor import Processor
from projectionist.hooks import WorkerHooks
from projectionist.partitioning import Partition
from projectionist.records import ANY, ExpectedVersion, NewEvent
from projectionist.store.appending import StreamAppend, append, append_many
from projectionist.store.connection import Connection, connect
from projectionist.store.schema import migrate


class _Versions:
    def __init__(self, exact: bool) -> None:
        self.exact = exact
        self.version: dict[str, int] = {}

    def expect(self, agg: str, count: int) -> ExpectedVersion:
        if not self.exact:
            return ANY
        current = self.version.get(agg, 0)
        self.version[agg] = current + count
        return current


class _OurWriter(Writer):
    def __init__(self, ours: Projectionist) -> None:
        self.conn = connect(ours.url, autocommit=True)
        self.versions = _Versions(ours.exact_versions)
        self.notify = ours.notify

    def write(self, aggregate: str, body: dict[str, Any]) -> None:
        append(
            self.conn,
            aggregate,
            [NewEvent(EVENT_TYPE, body)],
            expected_version=self.versions.expect(aggregate, 1),
            notify=self.notify,
        )

    def close(self) -> None:
        self.conn.close()


class Projectionist(Contestant):
    key = "projectionist"
    label = "projectionist"

    def __init__(self, url: str, *, exact_versions: bool = False, notify_per_append: bool = False) -> None:
        super().__init__(url)
        self.exact_versions = exact_versions
        #: None: the default (a NOTIFY only while a worker sleeps); True: NOTIFY in every append.
        self.notify: bool | None = True if notify_per_append else None
        if exact_versions:
            self.key = "projectionist_exact"
            self.label = "projectionist (exact expected_version)"
        if notify_per_append:
            self.key = "projectionist_notify"
            self.label = "projectionist (notify=True)"
        self.versions = _Versions(exact_versions)

    def setup(self) -> None:
        with connect(self.url, autocommit=True) as conn:
            migrate(conn)
            conn.execute(READ_MODEL_DDL)

    def reset(self) -> None:
        with connect(self.url, autocommit=True) as conn:
            conn.execute(
                "TRUNCATE events, projection_checkpoints, projection_groups, bench_read_model "
                "RESTART IDENTITY"
            )
        self.versions = _Versions(self.exact_versions)

    def events_table(self) -> str:
        return "events"

    def append_batches(self, transactions: list[list[Event]]) -> float:
        with connect(self.url, autocommit=True) as conn:
            started = time.perf_counter()
            for txn in transactions:
                appends = [
                    StreamAppend(
                        agg,
                        [NewEvent(EVENT_TYPE, body) for body in bodies],
                        self.versions.expect(agg, len(bodies)),
                    )
                    for agg, bodies in grouped(txn).items()
                ]
                append_many(conn, appends, notify=self.notify)
            return time.perf_counter() - started

    def writer(self, thread: int, events: list[Event]) -> Writer:
        return _OurWriter(self)

    def catch_up(
        self,
        *,
        read_model: bool,
        batch_size: int,
        name: str,
        hooks: WorkerHooks | None = None,
        connect_fn: Callable[..., Connection] = connect,
    ) -> tuple[int, float]:
        projection = ReadModelProjection(name) if read_model else NoopProjection(name)
        # The worker's own batch loop, minus the LISTEN/poll wait it does once caught up.
        processor = Processor(projection, Partition(0, 1), batch_size=batch_size, hooks=hooks)
        with connect_fn(self.url, autocommit=True) as conn:
            processor.start(conn)
            started = time.perf_counter()
            total = 0
            while True:
                outcome = processor.run_batch(conn)
                total += outcome.applied
                if not outcome.visible:
                    break
            return total, time.perf_counter() - started
