"""Sample event generation for ``projectionist append`` and the demo."""

from __future__ import annotations

import random
from collections.abc import Iterator

from projectionist.records import NewEvent
from projectionist.store.appending import StreamAppend, append_many
from projectionist.store.connection import Connection


def aggregate_name(index: int) -> str:
    return f"aggregate-{index}"


def sample_payload(rng: random.Random, aggregate_id: str) -> dict[str, object]:
    # About 200 bytes of JSON, the size the benchmarks use.
    return {
        "aggregate": aggregate_id,
        "amount": rng.randint(1, 10_000),
        "currency": "EUR",
        "note": "sample event appended by projectionist " + "x" * rng.randint(60, 90),
        "tags": ["demo", "scaling"],
    }


def append_sample_events(
    conn: Connection,
    *,
    count: int,
    aggregates: int,
    batch_size: int = 100,
    event_type: str = "SampleEvent",
    seed: int | None = None,
) -> Iterator[int]:
    """Append ``count`` events round-robin over ``aggregates`` aggregates.

    Each transaction holds up to ``batch_size`` events; yields the running total
    after each commit so callers can show progress.
    """
    rng = random.Random(seed)
    done = 0
    next_aggregate = 0
    while done < count:
        size = min(batch_size, count - done)
        grouped: dict[str, list[NewEvent]] = {}
        for _ in range(size):
            agg = aggregate_name(next_aggregate % aggregates)
            next_aggregate += 1
            grouped.setdefault(agg, []).append(NewEvent(event_type, sample_payload(rng, agg)))
        with conn.transaction():
            append_many(conn, [StreamAppend(agg, evs) for agg, evs in grouped.items()])
        done += size
        yield done
