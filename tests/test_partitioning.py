"""Partitioning is FNV-1a 32-bit mod N, as Go's hash/fnv computes it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from projectionist.partitioning import fnv1a_32, partition_of


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        # Reference vectors of FNV-1a 32 (the same values Go's fnv.New32a returns).
        ("", 0x811C9DC5),
        ("a", 0xE40C292C),
        ("foobar", 0xBF9CF968),
    ],
)
def test_fnv1a_32_reference_vectors(data: str, expected: int) -> None:
    assert fnv1a_32(data) == expected


@given(st.text(min_size=1, max_size=64), st.integers(min_value=1, max_value=64))
def test_partition_is_deterministic_and_in_range(aggregate_id: str, total: int) -> None:
    first = partition_of(aggregate_id, total)
    assert 0 <= first < total
    assert partition_of(aggregate_id, total) == first
    assert first == fnv1a_32(aggregate_id.encode("utf-8")) % total


@given(st.text(min_size=1, max_size=64), st.integers(min_value=1, max_value=8))
def test_partitions_nest_when_n_doubles(aggregate_id: str, total: int) -> None:
    # h % 2N is either h % N or h % N + N: an aggregate on worker k of 2N workers
    # was on worker k mod N before, which is what makes doubling easy to reason about.
    assert partition_of(aggregate_id, 2 * total) % total == partition_of(aggregate_id, total)


def test_invalid_total_is_refused() -> None:
    with pytest.raises(ValueError, match="total_workers"):
        partition_of("a", 0)


def test_spread_is_even_for_sequential_ids() -> None:
    counts = [0, 0, 0, 0]
    for i in range(4000):
        counts[partition_of(f"aggregate-{i}", 4)] += 1
    assert all(800 < c < 1200 for c in counts), counts
