"""algorithms.token_bucket: a burst per key, then a steady rate; keys are independent."""

from __future__ import annotations

import pytest

from fedloom.algorithms.token_bucket import TokenBuckets


def test_a_burst_then_the_rate_per_key() -> None:
    buckets = TokenBuckets(burst=3, per_s=2.0)
    assert [buckets.take("a", 0.0) for _ in range(4)] == [True, True, True, False]
    assert buckets.take("b", 0.0)  # another key has its own burst
    assert not buckets.take("a", 0.25)  # half a token earned
    assert buckets.take("a", 0.5)  # one token after 0.5 s at 2/s
    assert not buckets.take("a", 0.5)
    assert [buckets.take("a", 100.0) for _ in range(4)] == [True, True, True, False]  # capped


def test_a_clock_that_goes_back_earns_nothing() -> None:
    buckets = TokenBuckets(burst=1, per_s=1.0)
    assert buckets.take("a", 10.0)
    assert not buckets.take("a", 5.0)


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError):
        TokenBuckets(burst=0.5, per_s=1.0)
    with pytest.raises(ValueError):
        TokenBuckets(burst=2, per_s=-1.0)
