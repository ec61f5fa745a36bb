"""Per-model serving statistics for /metrics: time queued, time computing, batch sizes.

Counted once per request by the serving table, whichever protocol the request came by.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

# Seconds: queue and compute times of one request, from tens of microseconds to seconds.
TIME_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass
class Histogram:
    """Counts per bucket (the last one past every bound), their sum and count."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1


@dataclass
class ModelStats:
    """One model version's histograms."""

    queue_s: Histogram = field(default_factory=lambda: Histogram(TIME_BUCKETS_S))
    compute_s: Histogram = field(default_factory=lambda: Histogram(TIME_BUCKETS_S))
    batch_size: Histogram = field(default_factory=lambda: Histogram(BATCH_BUCKETS))


class ServingStats:
    """The histograms of every model version that answered a request."""

    def __init__(self) -> None:
        self.models: dict[tuple[str, str], ModelStats] = {}

    def record(
        self, model: str, version: str, queue_s: float, compute_s: float, batch_size: int
    ) -> None:
        """Count one answered request."""
        s = self.models.get((model, version))
        if s is None:
            s = self.models[(model, version)] = ModelStats()
        s.queue_s.observe(queue_s)
        s.compute_s.observe(compute_s)
        s.batch_size.observe(batch_size)

    def snapshot(self) -> list[tuple[tuple[str, str], ModelStats]]:
        """(model, version) and its stats, sorted."""
        return sorted(self.models.items())
