"""Inference metrics: counted per model version in windows, cut into numbered batches."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from protocol.reports import MetricsBatch, SeriesWindow


class MetricsRecorder:
    """Accumulates the current window; ``cut`` turns it into a batch with the next seq.

    Runs on the event loop only, so it needs no lock.
    """

    def __init__(self, agent_id: str, next_seq: int, now: datetime) -> None:
        self.agent_id = agent_id
        self.next_seq = next_seq
        self._window_start = now
        self._series: dict[tuple[str, str], SeriesWindow] = {}
        self.totals: dict[tuple[str, str], list[int]] = {}  # (model, version) -> [requests, errors]

    def record(self, model: str, version: str, latency_ms: float, error: bool) -> None:
        """Count one inference."""
        key = (model, version)
        s = self._series.get(key)
        if s is None:
            s = self._series[key] = SeriesWindow(model, version)
        s.requests += 1
        s.latency_ms.add(max(latency_ms, 0.0))
        t = self.totals.setdefault(key, [0, 0])
        t[0] += 1
        if error:
            s.errors += 1
            t[1] += 1

    def cut(self, now: datetime, persist_seq: Callable[[int], None]) -> MetricsBatch | None:
        """Close the window; None when nothing happened in it.

        ``persist_seq`` stores the next seq before the batch exists, so a restart never reuses
        a number the control plane may already hold.
        """
        if not self._series:
            self._window_start = now
            return None
        seq = self.next_seq
        persist_seq(seq + 1)
        self.next_seq = seq + 1
        batch = MetricsBatch(
            agent_id=self.agent_id,
            seq=seq,
            window_start=self._window_start,
            window_end=now,
            series=tuple(self._series[k] for k in sorted(self._series)),
        )
        self._series = {}
        self._window_start = now
        return batch
