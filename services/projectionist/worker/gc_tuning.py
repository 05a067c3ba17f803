"""Garbage-collector settings for a long-running worker or API process.

The start-up heap is frozen and the young-generation threshold raised, so
the collector runs about once per few batches instead of several times per
batch. Measurements: ``docs/design/gc-tuning.md``.
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
