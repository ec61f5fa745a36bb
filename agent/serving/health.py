"""The health window's verdict on a version that just took traffic (pure).

After an activation the new version serves with the one it replaced kept loaded. Until the
window ends, every request is counted; once at least ``min_requests`` were seen and more than
``max_error_rate`` of them failed, the new version is rolled back.
"""

from __future__ import annotations

from enum import Enum


class Verdict(Enum):
    WATCHING = "watching"  # inside the window, not failing (yet)
    PASSED = "passed"  # the window is over: the previous version may go
    FAILING = "failing"  # roll back now


def health_verdict(
    *,
    now: float,
    until: float,
    requests: int,
    errors: int,
    min_requests: int,
    max_error_rate: float,
) -> Verdict:
    """The verdict with ``requests`` and ``errors`` counted so far (this request included)."""
    if now > until:
        return Verdict.PASSED
    if requests >= min_requests and errors / requests > max_error_rate:
        return Verdict.FAILING
    return Verdict.WATCHING


def rollback_reason(*, requests: int, errors: int, window_s: float, max_error_rate: float) -> str:
    """What the agent reports for a version the health window rolled back."""
    return (
        f"{errors} of {requests} requests failed within "
        f"{window_s:g}s of activation (limit "
        f"{max_error_rate:.0%}); rolled back"
    )
