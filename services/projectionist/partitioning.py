"""Deterministic hash partitioning of aggregate IDs, compatible with the Go original.

partition = FNV-1a 32-bit(aggregate_id as UTF-8) mod total_workers, exactly as
Go's ``hash/fnv.New32a`` computes it, so a mixed Go/Python fleet agrees on
which worker owns which aggregate.
"""

from __future__ import annotations

from dataclasses import dataclass

_FNV32_OFFSET = 0x811C9DC5
_FNV32_PRIME = 0x01000193
_MASK32 = 0xFFFFFFFF


def fnv1a_32(data: str | bytes) -> int:
    """FNV-1a 32-bit hash, as an unsigned int in [0, 2**32)."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    h = _FNV32_OFFSET
    for byte in raw:
        h = ((h ^ byte) * _FNV32_PRIME) & _MASK32
    return h


def partition_of(aggregate_id: str, total_workers: int) -> int:
    """The worker (0-based) that owns ``aggregate_id`` among ``total_workers``."""
    if total_workers < 1:
        raise ValueError(f"total_workers must be >= 1, got {total_workers}")
    return fnv1a_32(aggregate_id) % total_workers


@dataclass(frozen=True, slots=True)
class Partition:
    """Partition ``worker_id`` of ``total_workers``: the aggregates :func:`partition_of` gives it."""

    worker_id: int
    total_workers: int

    def __post_init__(self) -> None:
        if self.total_workers < 1 or not 0 <= self.worker_id < self.total_workers:
            raise ValueError(f"invalid partition {self.worker_id}/{self.total_workers}")

    def __str__(self) -> str:
        return f"{self.worker_id}/{self.total_workers}"
