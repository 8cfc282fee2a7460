"""Token buckets: bursts pass, a steady excess is refused with the wait until a token."""

from __future__ import annotations

import pytest

from easel.errors import RateLimited
from easel.safety.ratelimit import TokenBuckets


def test_a_burst_passes_then_the_rate_holds() -> None:
    buckets = TokenBuckets(rate=2.0, burst=3)
    assert [buckets.take("alice", now=0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("alice", now=0.0) == pytest.approx(0.5)  # next token in 1/rate
    assert buckets.take("bob", now=0.0) == 0.0  # keys are independent
    assert buckets.take("alice", now=0.5) == 0.0  # refilled one
    assert buckets.take("alice", now=0.5) > 0


def test_refill_never_exceeds_the_burst() -> None:
    buckets = TokenBuckets(rate=1.0, burst=2)
    buckets.take("a", now=0.0)
    taken = [buckets.take("a", now=100.0) for _ in range(3)]
    assert taken[:2] == [0.0, 0.0] and taken[2] > 0


def test_check_raises_429_with_retry_after() -> None:
    buckets = TokenBuckets(rate=1.0, burst=1)
    buckets.check("alice", 0.0, "user 'alice'")
    with pytest.raises(RateLimited) as limited:
        buckets.check("alice", 0.25, "user 'alice'")
    body = limited.value.to_dict()
    assert limited.value.status == 429 and body["code"] == "rate_limited"
    assert body["retry_after"] == pytest.approx(0.8)


def test_memory_stays_bounded_by_forgetting_full_buckets() -> None:
    buckets = TokenBuckets(rate=10.0, burst=1, max_keys=100)
    for i in range(1000):
        buckets.take(f"user{i}", now=float(i))
    assert len(buckets._buckets) <= 100
