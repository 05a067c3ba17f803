"""The one backoff policy every retry shares: exponential, jittered, capped."""

from __future__ import annotations

import pytest

from projectionist.backoff import Backoff


def test_the_delay_doubles_from_initial_up_to_the_cap_and_reset_starts_over() -> None:
    backoff = Backoff(initial=0.1, maximum=1.0, jitter=0.0)
    assert [backoff.next_delay() for _ in range(6)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    backoff.reset()
    assert backoff.next_delay() == pytest.approx(0.1)


def test_jitter_only_shortens_the_delay() -> None:
    backoff = Backoff(initial=1.0, maximum=1.0, jitter=0.5)
    delays = [backoff.next_delay() for _ in range(200)]
    assert all(0.5 <= d <= 1.0 for d in delays)
    assert len(set(delays)) > 1


def test_max_attempts_bounds_exhausted() -> None:
    backoff = Backoff(max_attempts=2)
    assert not backoff.exhausted()
    backoff.next_delay()
    backoff.next_delay()
    assert backoff.exhausted()
    assert not Backoff().exhausted()


@pytest.mark.parametrize(
    "kwargs",
    [{"initial": 0.0}, {"initial": 2.0, "maximum": 1.0}, {"jitter": 1.5}],
    ids=["zero-initial", "maximum-below-initial", "jitter-above-one"],
)
def test_impossible_parameters_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="Backoff"):
        Backoff(**kwargs)  # type: ignore[arg-type]


def test_the_backoff_stays_at_its_cap_after_a_thousand_failures() -> None:
    # multiplier ** attempts overflows at 1024 attempts (about two hours of an
    # outage at the reconnect cap): the delay stays the maximum, and the worker
    # must not die of OverflowError.
    backoff = Backoff(initial=0.1, maximum=10.0, jitter=0.0)
    backoff.attempts = 5000
    assert backoff.next_delay() == 10.0
