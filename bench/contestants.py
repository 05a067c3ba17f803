"""The contract every contestant (raw psycopg, projectionist, eventsourcing, Message DB) implements.

A workload calls these methods and times them; a contestant only knows how to
write and read its own store. Connections are opened before a timer starts and
closed after it stops, for every contestant alike.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable
from typing import Any

import psycopg

from bench.data import PEER_CHECKPOINT_SAVE, READ_MODEL_UPSERT, Event, coalesce


class Unavailable(Exception):
    """The contestant cannot run here (package missing, install failed); the reason goes in the table."""


class Writer(abc.ABC):
    """One thread's single-event appender (workload 2), with its own connection."""

    @abc.abstractmethod
    def write(self, aggregate: str, body: dict[str, Any]) -> None: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the connection."""


class Contestant(abc.ABC):
    key: str
    label: str

    def __init__(self, url: str) -> None:
        self.url = url

    def connect(self, **kwargs: Any) -> psycopg.Connection[Any]:
        return psycopg.connect(self.url, autocommit=True, **kwargs)

    @abc.abstractmethod
    def setup(self) -> None:
        """Create the store's schema (called once)."""

    @abc.abstractmethod
    def reset(self) -> None:
        """Empty the store, read models and checkpoints."""

    @abc.abstractmethod
    def append_batches(self, transactions: list[list[Event]]) -> float:
        """Workload 1: one transaction per list, on one connection. Returns the seconds spent."""

    @abc.abstractmethod
    def writer(self, thread: int, events: list[Event]) -> Writer:
        """Workload 2: a writer for one thread, prepared (connected) before the clock starts."""

    @abc.abstractmethod
    def catch_up(self, *, read_model: bool, batch_size: int, name: str) -> tuple[int, float]:
        """Workload 3: read everything in batches; returns (events read, seconds)."""

    @abc.abstractmethod
    def events_table(self) -> str:
        """The qualified table holding the events (for VACUUM ANALYZE and stats)."""

    def vacuum_analyze(self) -> None:
        # ANALYZE gives every contestant fresh statistics; VACUUM sets hint bits
        # and the visibility map, so no contestant's first scan pays for them.
        with self.connect() as conn:
            conn.execute(f"VACUUM ANALYZE {self.events_table()}")

    def count(self) -> int:
        with self.connect() as conn:
            row = conn.execute(f"SELECT count(*) FROM {self.events_table()}").fetchone()
        return int(row[0]) if row else 0

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release anything kept between workloads."""


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


Row = tuple[Any, ...]


def paged_catch_up(
    conn: psycopg.Connection[Any],
    *,
    read_model: bool,
    name: str,
    first: int,
    read_page: Callable[[int], list[Row]],
    position_of: Callable[[Row], int],
    next_from: Callable[[Row], int],
    model_rows: Callable[[list[Row]], list[tuple[str, int]]],
) -> tuple[int, float]:
    """The plain consumers' catch-up loop (raw psycopg and Message DB): page by position.

    ``read_page(p)`` returns the next decoded rows from position ``p``, which
    starts at ``first`` and moves to ``next_from(last row)``. With a read model,
    each page's upserts (``model_rows``: aggregate and position per row) and a
    checkpoint at ``position_of(last row)`` commit in the page's transaction.
    Returns (rows read, seconds).
    """
    started = time.perf_counter()
    position = first
    total = 0
    while True:
        if read_model:
            with conn.transaction():
                rows = read_page(position)
                if rows:
                    with conn.cursor() as cur:
                        cur.executemany(READ_MODEL_UPSERT, coalesce(model_rows(rows)))
                    conn.execute(PEER_CHECKPOINT_SAVE, (name, position_of(rows[-1])))
        else:
            rows = read_page(position)
        if not rows:
            return total, time.perf_counter() - started
        total += len(rows)
        position = next_from(rows[-1])
