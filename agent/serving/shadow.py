"""Shadow scoring: the live version answers, the old one scores the same input for drift."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from protocol.reports import MAX_DRIFT


def score_with_shadow(
    live: Any, shadow: Any, feeds: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], float, float | None, bool]:
    """Run live then shadow on the same input (in a worker thread).

    Returns (live outputs, seconds the shadow took, mean absolute difference of the first
    outputs or None when they cannot be compared, whether every row's argmax agrees).
    """
    out = live.run(feeds)
    t0 = time.perf_counter()
    try:
        old = shadow.run(feeds)
    except Exception:  # a failing shadow must never fail the live request
        return out, time.perf_counter() - t0, None, False
    spent = time.perf_counter() - t0
    name = live.outputs[0].name
    a, b = out.get(name), old.get(shadow.outputs[0].name)
    if a is None or b is None or a.shape != b.shape or a.size == 0:
        return out, spent, None, False
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    drift = float(diff.mean())
    if not np.isfinite(drift):  # NaN or inf outputs: nothing to compare, and a report refuses it
        return out, spent, None, False
    drift = min(drift, MAX_DRIFT)
    agree = bool(a.ndim >= 1 and a.shape[-1] > 1 and (a.argmax(-1) == b.argmax(-1)).all())
    return out, spent, drift, agree
