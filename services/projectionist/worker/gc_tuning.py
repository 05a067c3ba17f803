"""Garbage-collector settings for a long-running worker or API process.

A worker allocates a RecordedEvent, a decoded payload and its contents for
every event, and drops them all when the batch commits. With CPython's default
young-generation threshold (700 allocations) the collector ran several times
per 500-event batch, each time also walking whatever the batch still held,
and the older generations kept re-walking the start-up heap: imports, the
telemetry SDKs, the metric registry. Measured on a no-op catch-up, collection
took about a sixth of a worker's time without telemetry, and more with it.

:func:`tune_for_throughput` freezes the start-up heap (``gc.freeze``: those
objects live as long as the process, so scanning them can only waste time)
and raises the young-generation threshold so that collection runs about once
per few batches. Reference counting still frees everything without a cycle at
once; only cyclic garbage waits a little longer to be found. The append API
gains the same way on a smaller scale: each request allocates a few hundred
objects, and the default threshold sent the collector over the start-up heap
every few requests.
"""

from __future__ import annotations

import gc

#: Allocations between young-generation collections (CPython's default is 700).
YOUNG_THRESHOLD = 20_000


def tune_for_throughput() -> None:
    """Call once, after start-up and before the work loop (``projectionist worker``, ``pool``, ``api`` do)."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
