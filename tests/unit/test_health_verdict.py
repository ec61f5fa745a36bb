"""agent/serving/health.py: the post-activation health window's verdict."""

from __future__ import annotations

from agent.serving.health import Verdict, health_verdict, rollback_reason


def verdict(now: float = 5.0, requests: int = 10, errors: int = 0) -> Verdict:
    return health_verdict(
        now=now, until=10.0, requests=requests, errors=errors, min_requests=10, max_error_rate=0.5
    )


def test_a_healthy_version_is_watched_until_the_window_ends_then_passes() -> None:
    assert verdict(errors=5) is Verdict.WATCHING  # at the limit is not over it
    assert verdict(now=10.0) is Verdict.WATCHING  # the last instant still counts
    assert verdict(now=10.001) is Verdict.PASSED


def test_too_many_errors_fail_only_after_enough_requests() -> None:
    assert verdict(requests=9, errors=9) is Verdict.WATCHING  # too few to judge
    assert verdict(requests=10, errors=6) is Verdict.FAILING
    assert verdict(requests=10, errors=10) is Verdict.FAILING


def test_a_window_that_is_over_passes_whatever_the_errors() -> None:
    assert verdict(now=11.0, requests=100, errors=100) is Verdict.PASSED


def test_the_reason_names_the_count_the_window_and_the_limit() -> None:
    reason = rollback_reason(requests=10, errors=6, window_s=30.0, max_error_rate=0.5)
    assert reason == "6 of 10 requests failed within 30s of activation (limit 50%); rolled back"
