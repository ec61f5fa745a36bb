"""A token bucket shared by every download, for ``--max-download-rate``."""

from __future__ import annotations

import asyncio
import time


class TokenBucket:
    """Allows ``rate`` bytes per second on average, bursts up to one second's worth."""

    def __init__(self, rate: float) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.capacity = rate
        self.tokens = rate
        self.updated = time.monotonic()
        self._lock = asyncio.Lock()

    async def consume(self, n: int) -> None:
        """Wait until ``n`` bytes may pass."""
        async with self._lock:
            now = time.monotonic()
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
            self.updated = now
            self.tokens -= n
            if self.tokens < 0:
                await asyncio.sleep(-self.tokens / self.rate)
