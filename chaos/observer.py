"""The elastic runs' observer: the group's locks read every 50 ms, and every change kept.

Each time the elastic measurements report (a join settled, a partition
owned again) is the first of these samples to show it: the server's own
view of which session holds which lock, late by up to one interval.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg

from projectionist.consume import membership
from projectionist.store.connection import connect
from projectionist.testing import poll_until

#: The test projection the elastic runs apply (tests.projections:Recorder).
PROJECTION = "recorder"
#: Seconds between the observer's looks at the group's locks.
OBSERVE_INTERVAL = 0.05


@dataclass(frozen=True, slots=True)
class Sample:
    """The group's locks at one moment: partition -> session pid, member number -> session pid."""

    at: float
    owners: dict[int, int]
    members: dict[int, int]

    def held_by(self, pid: int) -> set[int]:
        return {k for k, p in self.owners.items() if p == pid}

    def settled(self, partitions: int) -> bool:
        """Every partition owned, and every member holding exactly its fair share."""
        if len(self.owners) != partitions or not self.members:
            return False
        view = membership.GroupView(partitions, self.members, self.owners)
        return all(len(self.held_by(pid)) == view.target(n, partitions) for n, pid in self.members.items())


class Observer:
    """Reads the group's locks every ``interval`` seconds on a connection of its own; keeps each change."""

    def __init__(self, database_url: str, partitions: int, interval: float = OBSERVE_INTERVAL) -> None:
        self.database_url = database_url
        self.partitions = partitions
        self.interval = interval
        self.samples: list[Sample] = []
        self._lock = threading.Lock()
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="elastic-observer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._halt.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        conn = None
        while not self._halt.is_set():
            try:
                if conn is None or conn.closed:
                    conn = connect(self.database_url, application_name="chaos:observer", autocommit=True)
                view = membership.read_view(conn, PROJECTION, self.partitions)
                sample = Sample(time.monotonic(), view.owners, view.members)
                with self._lock:
                    last = self.samples[-1] if self.samples else None
                    if last is None or (last.owners, last.members) != (sample.owners, sample.members):
                        self.samples.append(sample)
            except psycopg.Error:
                if conn is not None:
                    conn.close()
                conn = None
            self._halt.wait(self.interval)
        if conn is not None:
            conn.close()

    @property
    def last(self) -> Sample | None:
        with self._lock:
            return self.samples[-1] if self.samples else None

    def wait(self, predicate: Callable[[Sample], bool], since: float, timeout: float) -> Sample | None:
        """The first sample taken after ``since`` for which ``predicate`` holds."""

        def found() -> Sample | None:
            with self._lock:
                return next((s for s in self.samples if s.at >= since and predicate(s)), None)

        at = poll_until(lambda: found() is not None, timeout, interval=self.interval / 2)
        return None if at is None else found()

    def moves(self, since: float, until: float) -> tuple[set[int], int]:
        """Partitions whose owner changed to another session in [since, until], and how many changes.

        A partition without an owner for a while (between a release and the
        next take) moves once, when another session takes it.
        """
        with self._lock:
            before = [s for s in self.samples if s.at < since][-1:]
            window = before + [s for s in self.samples if since <= s.at <= until]
        moved: set[int] = set()
        count = 0
        for k in range(self.partitions):
            owner: int | None = None
            for s in window:
                now = s.owners.get(k)
                if now is None:
                    continue
                if owner is not None and now != owner:
                    moved.add(k)
                    count += 1
                owner = now
        return moved, count
