"""When a delivery is tried again, and when it is given up (pure)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

Verdict = Literal["delivered", "retry", "failed"]


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """Attempts per delivery and the jittered exponential back-off between them."""

    max_attempts: int = 8
    base_s: float = 5.0
    cap_s: float = 3600.0

    def delay_s(self, attempt: int, u: float | None = None) -> float:
        """Seconds before attempt ``attempt + 1``, after ``attempt`` failed ones (1 or more).

        "Equal jitter": half of the exponential step is fixed and half random, so retries of
        many deliveries spread out yet none comes back at once (``u`` in [0, 1): the draw).
        """
        step = min(self.cap_s, self.base_s * 2.0 ** min(max(attempt, 1) - 1, 30))
        draw = random.random() if u is None else u
        return step / 2 + draw * step / 2

    def verdict(self, status: int | None, attempts: int) -> Verdict:
        """What one attempt's answer means: ``status`` None when none came (timeout, refused
        connection), ``attempts`` counting this one. 2xx is delivered; 410 Gone is given up at
        once (the receiver says it is gone for good); anything else is retried until the
        attempts are spent. A redirect is not followed: it is a failed attempt."""
        if status is not None and 200 <= status < 300:
            return "delivered"
        if status == 410 or attempts >= self.max_attempts:
            return "failed"
        return "retry"
