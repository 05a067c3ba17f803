"""The append load every scenario runs under: small transactions at a steady rate, whatever happens.

A fault that reaches the workers reaches the appender too (a restart, a
dropped connection). It reconnects through the project's one backoff helper
and carries on. An append whose commit was cut off is neither counted nor
retried: the checks compare the read model with the events table, never with
this counter, so an append that committed unseen is still checked.
"""

from __future__ import annotations

import random
import threading
import time

import psycopg

from projectionist.backoff import Backoff
from projectionist.records import NewEvent
from projectionist.store.appending import append
from projectionist.store.connection import Connection, connect

#: Every scenario's aggregates are named ``agg-0`` … ``agg-{aggregates-1}``.
AGGREGATE_PREFIX = "agg-"


class Load:
    """Appends 1 to 3 events to one random aggregate per transaction, ``rate`` events/s on average.

    ``hot`` names an aggregate that gets ``hot_share`` of the transactions on
    top of its ordinary share, for faults that concern one busy aggregate.
    ``rate``, ``hot``, ``hot_share``, ``events_per_transaction`` (the range
    each transaction's size is drawn from) and ``notify`` (``append``'s: None,
    the default, wakes sleeping workers; False never does) may be changed
    while it runs.

    Like the worker thread of eventsourcing's projection runner, an unexpected
    error is kept and re-raised by :meth:`stop`; connection errors are the
    expected weather and only counted.
    """

    def __init__(
        self,
        database_url: str,
        *,
        rate: float = 300.0,
        aggregates: int = 40,
        seed: int = 0,
        hot: str | None = None,
        hot_share: float = 0.0,
        events_per_transaction: tuple[int, int] = (1, 3),
        notify: bool | None = None,
    ) -> None:
        if rate <= 0 or aggregates < 1:
            raise ValueError("Load needs rate > 0 and aggregates >= 1")
        if not 0 <= hot_share < 1:
            raise ValueError("Load needs 0 <= hot_share < 1")
        if not 1 <= events_per_transaction[0] <= events_per_transaction[1]:
            raise ValueError("Load needs 1 <= the fewest <= the most events per transaction")
        self.database_url = database_url
        self.rate = rate
        self.aggregates = aggregates
        #: While set, this aggregate gets ``hot_share`` of the transactions.
        self.hot = hot
        self.hot_share = hot_share
        self.events_per_transaction = events_per_transaction
        self.notify = notify
        self.appended = 0
        self.connection_errors = 0
        self._rng = random.Random(seed)
        self._halt = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="chaos-load", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._halt.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def stop_quietly(self) -> None:
        """Stop without raising: for clean-up after a scenario already failed."""
        self._halt.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # re-raised by stop()
            self._error = e

    def _loop(self) -> None:
        backoff = Backoff(initial=0.05, maximum=1.0)
        conn: Connection | None = None
        next_at = time.monotonic()
        n = 0
        while not self._halt.is_set():
            fewest, most = self.events_per_transaction
            # (fewest + most) / 2 events per transaction on average.
            interval = (fewest + most) / 2 / self.rate
            try:
                if conn is None:
                    conn = connect(self.database_url, application_name="chaos:load", autocommit=True)
                    backoff.reset()
                if self.hot is not None and self._rng.random() < self.hot_share:
                    aggregate = self.hot
                else:
                    aggregate = f"{AGGREGATE_PREFIX}{self._rng.randrange(self.aggregates)}"
                size = self._rng.randint(fewest, most)
                events = [NewEvent("ChaosEvent", {"n": n + i}) for i in range(size)]
                append(conn, aggregate, events, notify=self.notify)
                n += len(events)
                self.appended += len(events)
            except psycopg.OperationalError:
                self.connection_errors += 1
                if conn is not None:
                    conn.close()
                    conn = None
                self._halt.wait(backoff.next_delay())
                next_at = time.monotonic()
                continue
            now = time.monotonic()
            # Keep the rate; never burst to make up for a stall.
            next_at = max(next_at + interval, now - interval)
            self._halt.wait(max(0.0, next_at - now))
        if conn is not None:
            conn.close()
