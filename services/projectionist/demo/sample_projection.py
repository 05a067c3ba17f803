"""The sample projection: events per aggregate, the last version, and which workers touched it.

It checks itself: ``out_of_order`` counts events that did not follow their
aggregate's previous version, so the demo can prove each event was applied
once, in order, and each aggregate by exactly one worker.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from projectionist.consume.projection import BaseProjection, Tx
from projectionist.records import RecordedEvent
from projectionist.store.connection import Connection

log = logging.getLogger(__name__)

READ_MODEL_TABLE = "scalable_projection_aggregates"

_DDL = f"""
CREATE TABLE IF NOT EXISTS {READ_MODEL_TABLE} (
    aggregate_id   text PRIMARY KEY,
    event_count    bigint NOT NULL,
    last_version   bigint NOT NULL,
    out_of_order   bigint NOT NULL DEFAULT 0,
    worker_id      integer NOT NULL,
    total_workers  integer NOT NULL,
    workers        integer[] NOT NULL,
    updated_at     timestamptz NOT NULL DEFAULT now()
)
"""

# One statement per event, pipelined by executemany. RETURNING tells us whether
# the row is new (xmax = 0 on a fresh insert) so we can log first sightings.
_UPSERT = f"""
INSERT INTO {READ_MODEL_TABLE} AS r
    (aggregate_id, event_count, last_version, out_of_order, worker_id, total_workers, workers)
VALUES (%(aggregate_id)s, 1, %(version)s, (%(version)s <> 1)::int, %(worker)s, %(total)s,
        ARRAY[%(worker)s]::integer[])
ON CONFLICT (aggregate_id) DO UPDATE SET
    event_count = r.event_count + 1,
    last_version = excluded.last_version,
    out_of_order = r.out_of_order + (excluded.last_version <> r.last_version + 1)::int,
    worker_id = excluded.worker_id,
    total_workers = excluded.total_workers,
    workers = CASE WHEN excluded.worker_id = ANY(r.workers) THEN r.workers
                   ELSE r.workers || excluded.worker_id END,
    updated_at = now()
RETURNING aggregate_id, (xmax = 0) AS inserted
"""


class ScalableProjection(BaseProjection):
    name = "scalable_projection"

    def __init__(self, name: str | None = None) -> None:
        if name is not None:
            self.name = name

    def setup(self, conn: Connection) -> None:
        # Even CREATE TABLE IF NOT EXISTS needs CREATE on the schema, so a
        # worker role with only DML rights could never start; once the table
        # exists (its first start, or created beforehand) none is needed.
        row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (READ_MODEL_TABLE,)).fetchone()
        if not (row and row[0]):
            conn.execute(_DDL)

    def reset(self, conn: Connection) -> None:
        conn.execute(f"TRUNCATE {READ_MODEL_TABLE}")

    def apply(self, event: RecordedEvent, tx: Tx) -> None:
        self.apply_batch([event], tx)

    def apply_batch(self, events: Sequence[RecordedEvent], tx: Tx) -> None:
        params = [
            {
                "aggregate_id": e.aggregate_id,
                "version": e.aggregate_version,
                "worker": tx.worker_id,
                "total": tx.total_workers,
            }
            for e in events
        ]
        with tx.conn.cursor() as cur:
            cur.executemany(_UPSERT, params, returning=True)
            while True:
                row = cur.fetchone()
                if row is not None and row[1]:
                    log.info("aggregate %s -> worker %d/%d", row[0], tx.worker_id, tx.total_workers)
                if not cur.nextset():
                    break
