"""Per-user and per-service request rates: token buckets. Pure: callers pass ``now``."""

from __future__ import annotations

from dataclasses import dataclass

from easel.errors import RateLimited


@dataclass
class _Bucket:
    tokens: float
    updated: float


class TokenBuckets:
    """``rate`` requests per second on average, bursts of up to ``burst``, per key."""

    def __init__(self, rate: float, burst: float, *, max_keys: int = 100_000) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: dict[str, _Bucket] = {}

    def take(self, key: str, now: float) -> float:
        """Spend one token; returns 0.0 if allowed, else seconds until one is available."""
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                self._forget_full(now)
            bucket = self._buckets[key] = _Bucket(self.burst, now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
        bucket.updated = now
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return 0.0
        return (1 - bucket.tokens) / self.rate

    def check(self, key: str, now: float, what: str) -> None:
        """``take`` that raises ``RateLimited`` (429 with ``retry_after``)."""
        wait = self.take(key, now)
        if wait > 0:
            raise RateLimited(
                f"{what} sends more than {self.rate:g} requests/s; retry in {wait:.1f} s",
                retry_after=round(wait + 0.05, 1),
            )

    def _forget_full(self, now: float) -> None:
        """Buckets that have refilled hold no information: drop them to bound memory."""
        self._buckets = {
            key: bucket
            for key, bucket in self._buckets.items()
            if bucket.tokens + (now - bucket.updated) * self.rate < self.burst
        }
