"""What every contestant writes and reads: the same ~200-byte payloads, in the same transactions."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

EVENT_TYPE = "AmountRecorded"

#: Message DB needs ``category-id`` stream names; the other stores use the id alone.
MDB_CATEGORY = "bench"


def aggregate_id(index: int) -> str:
    return f"a{index:05d}"


def payload(rng: random.Random, aggregate: str) -> dict[str, Any]:
    """About 200 bytes of JSON (checked by :func:`payload_size`)."""
    return {
        "aggregate": aggregate,
        "amount": rng.randint(1000, 9999),
        "currency": "EUR",
        "note": "benchmark payload of roughly two hundred bytes " + "x" * 80,
        "tags": ["bench", "projectionist"],
    }


def payload_size() -> int:
    return len(json.dumps(payload(random.Random(0), aggregate_id(0))))


Event = tuple[str, dict[str, Any]]
"""(aggregate id, payload)"""


@dataclass(frozen=True, slots=True)
class BatchedPlan:
    """Workload 1: ``transactions`` of ``per_txn`` events over ``aggregates_per_txn`` aggregates each."""

    transactions: list[list[Event]]
    aggregates: int

    @property
    def events(self) -> int:
        return sum(len(t) for t in self.transactions)


def batched_plan(
    events: int, *, per_txn: int = 100, aggregates_per_txn: int = 10, aggregates: int = 1000, seed: int = 1
) -> BatchedPlan:
    """Round-robin over ``aggregates``, ``per_txn / aggregates_per_txn`` events per aggregate per transaction.

    Events of one aggregate sit together in the transaction (append_many takes one
    list per aggregate; the others get the same order so all insert the same rows).
    """
    rng = random.Random(seed)
    per_aggregate = per_txn // aggregates_per_txn
    transactions: list[list[Event]] = []
    next_aggregate = 0
    done = 0
    while done < events:
        txn: list[Event] = []
        for _ in range(aggregates_per_txn):
            agg = aggregate_id(next_aggregate % aggregates)
            next_aggregate += 1
            for _ in range(per_aggregate):
                if done + len(txn) >= events:
                    break
                txn.append((agg, payload(rng, agg)))
        transactions.append(txn)
        done += len(txn)
    return BatchedPlan(transactions, min(aggregates, next_aggregate))


def concurrent_plan(
    total: int, threads: int, *, aggregates_per_thread: int = 50, seed: int = 2
) -> list[list[Event]]:
    """Workload 2: each thread writes single events to aggregates of its own (no contention by design)."""
    rng = random.Random(seed)
    plan: list[list[Event]] = []
    per_thread = total // threads
    for t in range(threads):
        events: list[Event] = []
        for i in range(per_thread):
            agg = f"c{t}-{i % aggregates_per_thread:03d}"
            events.append((agg, payload(rng, agg)))
        plan.append(events)
    return plan


def grouped(txn: list[Event]) -> dict[str, list[dict[str, Any]]]:
    """One transaction's events per aggregate, in first-seen order."""
    out: dict[str, list[dict[str, Any]]] = {}
    for agg, body in txn:
        out.setdefault(agg, []).append(body)
    return out


# The small read model of workload 3, identical for every contestant: one row
# per aggregate, upserted once per aggregate per batch (the batch's events of
# one aggregate are coalesced first), plus the contestant's checkpoint, all in
# the batch's transaction.
READ_MODEL_DDL = """
CREATE TABLE IF NOT EXISTS bench_read_model (
    aggregate_id  text PRIMARY KEY,
    events        bigint NOT NULL,
    last_position bigint NOT NULL
)
"""
READ_MODEL_UPSERT = """
INSERT INTO bench_read_model AS r (aggregate_id, events, last_position) VALUES (%s, %s, %s)
ON CONFLICT (aggregate_id) DO UPDATE SET events = r.events + excluded.events,
                                         last_position = excluded.last_position
"""
# Peers and raw keep their own checkpoint in the same transaction, like projectionist.
PEER_CHECKPOINT_DDL = (
    "CREATE TABLE IF NOT EXISTS bench_checkpoint (name text PRIMARY KEY, position bigint NOT NULL)"
)
PEER_CHECKPOINT_SAVE = """
INSERT INTO bench_checkpoint (name, position) VALUES (%s, %s)
ON CONFLICT (name) DO UPDATE SET position = excluded.position
"""


def coalesce(rows: list[tuple[str, int]]) -> list[tuple[str, int, int]]:
    """[(aggregate, position)] -> [(aggregate, count, last position)], one per aggregate."""
    counts: dict[str, list[int]] = {}
    for agg, position in rows:
        entry = counts.get(agg)
        if entry is None:
            counts[agg] = [1, position]
        else:
            entry[0] += 1
            entry[1] = position
    return [(agg, c, p) for agg, (c, p) in counts.items()]


#: Workload 2 on the server alone (bench.server_only): statement key -> what
#: the report calls it, in report order (each row adds one piece of the
#: store's work to the one above); and the aggregates each client appends to.
SERVER_ONLY_STATEMENTS = {
    "raw": "raw psycopg's INSERT",
    "raw_returning": "raw psycopg's INSERT, returning the positions",
    "projectionist_no_notify": "projectionist's append, notify=False (+ the version check)",
    "projectionist": "projectionist's append, the default (+ the doorbell, no worker asleep)",
    "projectionist_notify": "projectionist's append, notify=True (NOTIFY in every transaction)",
}
SERVER_ONLY_AGGREGATES_PER_CLIENT = 50
