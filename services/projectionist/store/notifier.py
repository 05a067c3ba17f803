"""Waking workers without a NOTIFY in every append transaction.

Appends run with ``notify=False`` and :meth:`Notifier.poke` after they
commit; one thread sends at most one NOTIFY per ``min_interval``, and a poke
during a send triggers another. Why: ``docs/design/notifications.md``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from types import TracebackType

import psycopg
from psycopg import sql

from projectionist.backoff import Backoff
from projectionist.store.connection import NOTIFY_CHANNEL, Connection, connect

log = logging.getLogger(__name__)

_NOTIFY = sql.SQL("NOTIFY {}").format(sql.Identifier(NOTIFY_CHANNEL))


class Notifier:
    """A coalescing, background NOTIFY sender. Use as a context manager, or start()/close()."""

    def __init__(
        self,
        database_url: str,
        *,
        min_interval: float = 0.002,
        connect_fn: Callable[..., Connection] = connect,
    ) -> None:
        self.database_url = database_url
        self.min_interval = min_interval
        self._connect = connect_fn
        self._pending = threading.Event()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        #: Notifications sent so far (for tests and metrics).
        self.sent = 0

    def poke(self) -> None:
        """Note that events were committed; cheap and safe from any thread or event loop."""
        self._pending.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="projectionist-notifier", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closed.set()
        self._pending.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> Notifier:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _run(self) -> None:
        backoff = Backoff(initial=0.1, maximum=5.0)
        while not self._closed.is_set():
            try:
                with self._connect(
                    self.database_url, application_name="projectionist:notifier", autocommit=True
                ) as conn:
                    conn.execute("SET synchronous_commit = off")
                    backoff.reset()
                    self._serve(conn)
            except psycopg.Error as e:
                # Any database error, not only a lost connection (NOTIFY on a
                # server in recovery is an InternalError): the thread must live
                # on, or workers would wake only on their polls from then on.
                delay = backoff.next_delay()
                # Workers still poll, so a lost notifier costs latency, not events.
                log.warning("notifier: database unavailable (%s); retrying in %.1fs", e, delay)
                self._closed.wait(delay)

    def _serve(self, conn: Connection) -> None:
        while not self._closed.is_set():
            self._pending.wait()
            if self._closed.is_set():
                break
            # Clear before sending: a poke during the send schedules the next one.
            self._pending.clear()
            try:
                conn.execute(_NOTIFY)
            except psycopg.Error:
                self._pending.set()  # not sent: the next connection sends it
                raise
            self.sent += 1
            self._closed.wait(self.min_interval)
        conn.execute(_NOTIFY)  # covers appends poked just before close
