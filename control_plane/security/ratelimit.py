"""Per-caller request rate limits: a token bucket per API token or agent credential, and
one per source address for unauthenticated refusals (``peek`` before, ``take`` after).

Each replica keeps its own buckets in memory (a caller spread over N replicas gets up to N
times the rate; the limit is a guard against a runaway script or a stolen token hammering the
API, not an accounting device). A refused request gets 429 with ``Retry-After`` in whole
seconds. Buckets idle for a while are dropped so memory stays bounded by active callers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable


class RateLimiter:
    """``rate`` requests per second on average per key, bursts up to ``burst``."""

    def __init__(
        self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self._buckets: dict[object, tuple[float, float]] = {}  # key -> (tokens, updated)
        self._swept = clock()

    def take(self, key: object) -> float:
        """Spend one token of ``key``; 0 when allowed, else the seconds until one is back."""
        now = self.clock()
        tokens, updated = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - updated) * self.rate)
        if tokens < 1:
            self._buckets[key] = (tokens, now)
            return (1 - tokens) / self.rate
        self._buckets[key] = (tokens - 1, now)
        if now - self._swept > 60:
            self._sweep(now)
        return 0.0

    def peek(self, key: object) -> float:
        """0 when ``key`` has a token to spend, else the seconds until it has; spends nothing."""
        entry = self._buckets.get(key)
        if entry is None:
            return 0.0
        tokens, updated = entry
        tokens = min(self.burst, tokens + (self.clock() - updated) * self.rate)
        return 0.0 if tokens >= 1 else (1 - tokens) / self.rate

    def _sweep(self, now: float) -> None:
        full = self.burst / self.rate  # a bucket idle this long is full again: forget it
        self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < full}
        self._swept = now

    @staticmethod
    def retry_after(wait: float) -> str:
        """The ``Retry-After`` header value for a wait in seconds (whole seconds, at least 1)."""
        return str(max(1, math.ceil(wait)))
