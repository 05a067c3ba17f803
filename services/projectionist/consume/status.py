"""What ``projectionist status`` reports: per projection and worker, where it is and how far behind."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from psycopg import sql
from psycopg.pq import TransactionStatus

from projectionist.consume import lag, partition_indexes
from projectionist.consume.checkpoints import load_layers
from projectionist.consume.membership import GroupMembership, read_membership
from projectionist.consume.ownership import LIVE_EXPR
from projectionist.store.connection import Connection
from projectionist.store.streams import head_position


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    projection: str
    worker_id: int
    total_workers: int
    live: bool
    checkpoint_transaction_id: int
    checkpoint_position: int
    events_processed: int
    lag_events: int
    lag_seconds: float
    updated_at: datetime

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["updated_at"] = self.updated_at.isoformat()
        return data


@dataclass(frozen=True, slots=True)
class GroupStatus:
    """A projection's group configuration: partition count, generation, skip marks in force."""

    projection: str
    total_workers: int
    generation: int
    skip_layers: list[dict[str, Any]]
    #: Partitions whose own index exists and is valid (see partition_indexes.py);
    #: a single-partition group needs none and reports 1.
    indexed_partitions: int
    #: Elastic members, who owns what, and the moves in progress (read from pg_locks).
    membership: GroupMembership | None = None


@dataclass(frozen=True, slots=True)
class StoreStatus:
    head_position: int
    workers: list[WorkerStatus]
    groups: list[GroupStatus]
    #: Whether the events table has planner statistics: until it has, workers
    #: read without their partition indexes, however many exist.
    planner_statistics: bool = True

    def as_json(self) -> dict[str, Any]:
        projections: dict[str, Any] = {
            g.projection: {
                "total_workers": g.total_workers,
                "generation": g.generation,
                "skip_layers": g.skip_layers,
                "indexed_partitions": g.indexed_partitions,
                **(g.membership.as_json() if g.membership is not None else {}),
                "workers": [],
            }
            for g in self.groups
        }
        for w in self.workers:
            projections[w.projection]["workers"].append(w.as_json())
        return {
            "head_position": self.head_position,
            "planner_statistics": self.planner_statistics,
            "projections": projections,
        }


# "live" means a process holds the partition's ownership lock right now.
# Lag comes from lag.py, counted exactly: rows of the partition that the
# worker has not applied, including rows not yet visible to it because an
# older transaction is still open; the age of the oldest of them is the lag
# in seconds, so a caught-up worker shows 0.
_STATUS = sql.SQL(
    """
    SELECT c.projection_name, c.worker_id, c.total_workers,
           {live} AS live,
           c.last_transaction_id::text, c.last_global_position, c.events_processed, c.updated_at
    FROM projection_checkpoints c
    JOIN projection_groups g
      ON g.projection_name = c.projection_name AND g.total_workers = c.total_workers
    WHERE {where}
    ORDER BY c.projection_name, c.worker_id
    """
)


def read_status(conn: Connection, projection: str | None = None) -> StoreStatus:
    where = (
        sql.SQL("c.projection_name = {}").format(sql.Literal(projection)) if projection else sql.SQL("true")
    )
    if conn.info.transaction_status != TransactionStatus.IDLE:
        raise ValueError("read_status reads in a transaction of its own: call it outside a transaction")
    # One snapshot for the checkpoints and the lag counted after them, so a
    # group switched in between cannot leave a checkpoint without its lag.
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        rows = conn.execute(_STATUS.format(where=where, live=LIVE_EXPR)).fetchall()
        lags = {
            (x.projection, x.total_workers, x.worker_id): x
            for x in lag.read_lag(conn, [projection] if projection else None, None).partitions
        }
    workers = []
    for r in rows:
        behind = lags[(r[0], r[2], r[1])]
        workers.append(
            WorkerStatus(
                projection=r[0],
                worker_id=r[1],
                total_workers=r[2],
                live=r[3],
                checkpoint_transaction_id=int(r[4]),
                checkpoint_position=r[5],
                events_processed=r[6],
                lag_events=behind.lag_events,
                lag_seconds=round(behind.lag_seconds, 3),
                updated_at=r[7],
            )
        )
    indexed = {x.total_workers: x.valid for x in partition_indexes.summarize(conn)}
    groups = [
        GroupStatus(
            projection=name,
            total_workers=total,
            generation=generation,
            skip_layers=[
                {
                    "total_workers": layer.total_workers,
                    "lowest_position": layer.lowest.global_position,
                    "highest_position": layer.highest.global_position,
                }
                for layer in load_layers(conn, name)
            ],
            indexed_partitions=indexed.get(total, 0) if total > 1 else 1,
            membership=read_membership(conn, name, total),
        )
        for name, total, generation in conn.execute(
            "SELECT projection_name, total_workers, generation FROM projection_groups"
            " WHERE %s::text IS NULL OR projection_name = %s ORDER BY 1",
            (projection, projection),
        ).fetchall()
    ]
    return StoreStatus(head_position(conn), workers, groups, partition_indexes.has_statistics(conn))
