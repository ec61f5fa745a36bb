"""One jittered exponential back-off for every retry loop, agent and control plane alike."""

from __future__ import annotations

import random


class Backoff:
    """Delays of ``uniform(0, min(cap, base * factor**attempt))`` ("full jitter"); reset on
    success. Pure values (no sleeping), so both sides' retry loops share it."""

    def __init__(self, base: float = 0.5, cap: float = 30.0, factor: float = 2.0) -> None:
        self.base = base
        self.cap = cap
        self.factor = factor
        self.attempt = 0

    def next_delay(self) -> float:
        """The next delay, growing with each failure."""
        delay = random.uniform(0, min(self.cap, self.base * self.factor ** min(self.attempt, 16)))
        self.attempt += 1
        return delay

    def reset(self) -> None:
        """Back to the first delay after a success."""
        self.attempt = 0
