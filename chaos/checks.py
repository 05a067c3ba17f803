"""What the scenarios check in the database: the reference fold, catch-up, and partition ownership."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, LiteralString

import psycopg
from psycopg import sql
from tests.projections import verify_exactly_once

from projectionist.consume.ownership import group_key
from projectionist.store.connection import Connection, connect


@dataclass(frozen=True, slots=True)
class Fold:
    """The read model compared with a fold of the events table (all zero is a pass)."""

    events: int
    lost: int
    duplicated: int
    misordered: int
    wrong_worker: int

    @property
    def exact(self) -> bool:
        return self.lost == self.duplicated == self.misordered == self.wrong_worker == 0


_Query = LiteralString | sql.SQL | sql.Composed


class Db:
    """One observer connection that reconnects after a fault took it away."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self._conn: Connection | None = None

    @property
    def conn(self) -> Connection:
        if self._conn is None or self._conn.closed:
            self._conn = connect(self.database_url, application_name="chaos:observer", autocommit=True)
        return self._conn

    def rows(self, query: _Query, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        for attempt in (1, 2):
            try:
                return self.conn.execute(query, params).fetchall()
            except psycopg.OperationalError:
                self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def execute(self, statement: _Query) -> None:
        self.conn.execute(statement)

    def scalar(self, query: _Query, params: tuple[Any, ...] = ()) -> Any:
        rows = self.rows(query, params)
        return rows[0][0] if rows else None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- the questions the scenarios ask ---------------------------------------

    def event_count(self) -> int:
        return int(self.scalar("SELECT count(*) FROM events"))

    def unapplied(self, projection: str, *, up_to_position: int | None = None) -> int:
        """Events of the store not (yet) applied to ``projection``'s read model."""
        if self.scalar("SELECT to_regclass('applied_events') IS NULL"):
            return self.event_count()
        return int(
            self.scalar(
                "SELECT count(*) FROM events e WHERE (%s::bigint IS NULL OR e.global_position <= %s)"
                " AND NOT EXISTS (SELECT 1 FROM applied_events a"
                "                 WHERE a.event_id = e.event_id AND a.projection = %s)",
                (up_to_position, up_to_position, projection),
            )
        )

    def applied(self, projection: str) -> int:
        if self.scalar("SELECT to_regclass('applied_events') IS NULL"):
            return 0
        return int(self.scalar("SELECT count(*) FROM applied_events WHERE projection = %s", (projection,)))

    def owners(self, projection: str, total_workers: int) -> dict[int, int]:
        """Partition -> backend pid of the session holding its ownership lock (see ownership.py)."""
        rows = self.rows(
            "SELECT l.objid::bigint::int, l.pid FROM pg_locks l"
            " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2"
            " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            " AND l.classid::bigint = (hashtext(%s)::bigint & 4294967295)",
            (group_key(projection, total_workers),),
        )
        return {int(r[0]): int(r[1]) for r in rows}

    def group_size(self, projection: str) -> int | None:
        value = self.scalar(
            "SELECT total_workers FROM projection_groups WHERE projection_name = %s", (projection,)
        )
        return None if value is None else int(value)

    def head(self) -> int:
        return int(self.scalar("SELECT coalesce(max(global_position), 0) FROM events"))

    def fold(self, projection: str) -> Fold:
        counts = verify_exactly_once(self.conn, projection)
        return Fold(events=self.event_count(), **counts)
