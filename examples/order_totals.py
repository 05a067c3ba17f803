"""A complete user projection: order totals, kept exactly-once next to the events."""

from projectionist import BaseProjection, RecordedEvent, Tx
from projectionist.store import Connection


class OrderTotals(BaseProjection):
    name = "order_totals"

    def setup(self, conn: Connection) -> None:  # before the first batch; idempotent DDL
        conn.execute(
            "CREATE TABLE IF NOT EXISTS order_totals ("
            " order_id text PRIMARY KEY, items int NOT NULL, total_cents bigint NOT NULL)"
        )

    def reset(self, conn: Connection) -> None:  # used by `projectionist rebuild`
        conn.execute("TRUNCATE order_totals")

    def apply(self, event: RecordedEvent, tx: Tx) -> None:
        if event.event_type == "ItemAdded":
            tx.execute(
                "INSERT INTO order_totals VALUES (%s, 1, %s) ON CONFLICT (order_id) DO UPDATE"
                " SET items = order_totals.items + 1, total_cents = order_totals.total_cents + %s",
                (event.aggregate_id, event.payload["price_cents"], event.payload["price_cents"]),
            )
