"""projectionist through its public API: ``append_many``/``append`` and the worker's ``Processor``.

Appends use the default ``expected_version=ANY`` (what ``projectionist append``
and the demo do), unless ``exact_versions`` is set: then each append passes the
stream's known version, as an application that loaded the aggregate would.
With ``notifier`` set, appends run with ``notify=False`` and poke a shared
coalescing ``projectionist.store.notifier.Notifier`` after each commit instead of
sending NOTIFY inside the append's transaction.
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
        self.notifier = ours.shared_notifier()

    def write(self, aggregate: str, body: dict[str, Any]) -> None:
        if self.notifier is None:
            append(
                self.conn,
                aggregate,
                [NewEvent(EVENT_TYPE, body)],
                expected_version=self.versions.expect(aggregate, 1),
            )
            return
        append(
            self.conn,
            aggregate,
            [NewEvent(EVENT_TYPE, body)],
            expected_version=self.versions.expect(aggregate, 1),
            notify=False,
        )
        self.notifier.poke()

    def close(self) -> None:
        self.conn.close()


class Projectionist(Contestant):
    key = "projectionist"
    label = "projectionist"

    def __init__(self, url: str, *, exact_versions: bool = False, notifier: bool = False) -> None:
        super().__init__(url)
        self.exact_versions = exact_versions
        self.use_notifier = notifier
        self._notifier: Any = None
        if exact_versions:
            self.key = "projectionist_exact"
            self.label = "projectionist (exact expected_version)"
        if notifier:
            from projectionist.store.notifier import Notifier  # noqa: F401 - fail early if it is missing

            self.key = "projectionist_notifier"
            self.label = "projectionist (notify=False + Notifier)"
        self.versions = _Versions(exact_versions)

    def shared_notifier(self) -> Any:
        """The one coalescing Notifier every writer pokes, started on first use (None if not in use)."""
        if self.use_notifier and self._notifier is None:
            from projectionist.store.notifier import Notifier

            self._notifier = Notifier(self.url)
            self._notifier.start()
        return self._notifier

    def close(self) -> None:
        if self._notifier is not None:
            self._notifier.close()
            self._notifier = None

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
            notifier = self.shared_notifier()
            for txn in transactions:
                appends = [
                    StreamAppend(
                        agg,
                        [NewEvent(EVENT_TYPE, body) for body in bodies],
                        self.versions.expect(agg, len(bodies)),
                    )
                    for agg, bodies in grouped(txn).items()
                ]
                if notifier is None:
                    append_many(conn, appends)
                else:
                    append_many(conn, appends, notify=False)
                    notifier.poke()
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
