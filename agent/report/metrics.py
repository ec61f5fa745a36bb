"""Inference metrics: windows of counts and latency sketches per model version (sent to the
control plane), and running totals with a latency histogram (exposed to Prometheus)."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from datetime import datetime

from protocol.reports import SeriesWindow

# Prometheus histogram bounds, in seconds.
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass
class Totals:
    """Counters since the agent started, for one model version."""

    requests: int = 0
    errors: int = 0
    latency_sum_s: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))


@dataclass(frozen=True)
class Window:
    """A closed window, ready to become a numbered batch."""

    start: datetime
    end: datetime
    series: tuple[SeriesWindow, ...]


class MetricsRecorder:
    """Counts every inference. Runs on the event loop only, so it needs no lock."""

    def __init__(self, now: datetime) -> None:
        self._window_start = now
        self._series: dict[tuple[str, str], SeriesWindow] = {}
        self.totals: dict[tuple[str, str], Totals] = {}

    def record(self, model: str, version: str, latency_s: float, error: bool) -> None:
        """Count one inference."""
        key = (model, version)
        s = self._series.get(key)
        if s is None:
            s = self._series[key] = SeriesWindow(model, version)
        t = self.totals.get(key)
        if t is None:
            t = self.totals[key] = Totals()
        latency_s = max(latency_s, 0.0)
        s.requests += 1
        s.latency_ms.add(latency_s * 1000.0)
        t.requests += 1
        t.latency_sum_s += latency_s
        t.buckets[bisect.bisect_left(LATENCY_BUCKETS_S, latency_s)] += 1
        if error:
            s.errors += 1
            t.errors += 1

    def record_shadow(self, model: str, version: str, drift: float, agree: bool) -> None:
        """Count one request also scored by the shadow version."""
        s = self._series.get((model, version))
        if s is None:  # record() runs first for the same request, so this is rare
            s = self._series[(model, version)] = SeriesWindow(model, version)
        s.shadow_count += 1
        s.drift_sum += drift
        s.argmax_agree += agree

    def take_window(self, now: datetime) -> Window | None:
        """Close the current window; None when nothing happened in it."""
        start, self._window_start = self._window_start, now
        if not self._series:
            return None
        series = tuple(self._series[k] for k in sorted(self._series))
        self._series = {}
        return Window(start, now, series)
