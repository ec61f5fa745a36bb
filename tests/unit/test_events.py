"""Webhook events: subscription patterns, signatures, receiver URLs, retry decisions (pure)."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from control_plane.events.receivers import address_allowed, check_url
from control_plane.events.retry import RetryPolicy
from control_plane.events.signing import signature, verify
from control_plane.events.types import EVENT_TYPES, check_patterns, matches, wanted
from protocol.exceptions import InvalidMessage


def test_patterns_cover_types_by_part() -> None:
    assert matches("rollout.*", "rollout.completed")
    assert not matches("rollout.*", "agent.offline")
    assert matches("*", "keyset.changed")
    assert wanted(["agent.offline", "keyset.*"], "keyset.changed")
    assert not wanted(["agent.offline"], "activation.failed")
    assert check_patterns(["rollout.*", "rollout.*", "agent.offline"]) == (
        "rollout.*",
        "agent.offline",
    )


@pytest.mark.parametrize(
    "raw", [[], "rollout.*", ["rollout.**"], ["nosuch.*"], ["Rollout.x"], [1], ["a" * 300]]
)
def test_bad_patterns_are_refused_naming_events(raw: object) -> None:
    with pytest.raises(InvalidMessage) as exc:
        check_patterns(raw)
    assert exc.value.field == "events"


def test_every_event_type_is_subscribable_by_name() -> None:
    for t in EVENT_TYPES:
        assert check_patterns([t]) == (t,)


def test_signature_is_hmac_sha256_of_the_raw_body() -> None:
    body = b'{"id":"x","type":"rollout.completed"}'
    want = "sha256=" + hmac.new(b"mfw_secret", body, hashlib.sha256).hexdigest()
    assert signature("mfw_secret", body) == want
    assert verify("mfw_secret", body, want)
    assert not verify("mfw_secret", body + b" ", want)
    assert not verify("other", body, want)
    assert not verify("mfw_secret", body, None)


@pytest.mark.parametrize(
    ("address", "private_ok", "allowed"),
    [
        ("93.184.216.34", False, True),
        ("127.0.0.1", False, False),
        ("127.0.0.1", True, True),
        ("10.1.2.3", True, True),
        ("10.1.2.3", False, False),
        ("169.254.169.254", True, False),  # a cloud's metadata service, never
        ("fe80::1", True, False),
        ("0.0.0.0", True, False),
        ("224.0.0.1", True, False),
        ("::ffff:169.254.169.254", True, False),
        ("::ffff:127.0.0.1", False, False),
        ("not-an-ip", True, False),
    ],
)
def test_addresses_a_delivery_may_reach(address: str, private_ok: bool, allowed: bool) -> None:
    assert address_allowed(address, private_ok) is allowed


def test_good_receiver_urls_pass_as_given() -> None:
    for url in ("https://hooks.example.com/mf?x=1", "http://receiver.internal:8080/in"):
        assert check_url(url, allow_private=False) == url
    assert check_url("http://127.0.0.1:9/x", allow_private=True) == "http://127.0.0.1:9/x"


@pytest.mark.parametrize(
    ("url", "private_ok"),
    [
        (None, True),
        ("", True),
        ("ftp://example.com/x", True),
        ("file:///etc/passwd", True),
        ("http:///nohost", True),
        ("https://user:pw@example.com/", True),
        ("https://example.com/#frag", True),
        ("https://exa mple.com/", True),
        ("https://example.com/\x00", True),
        ("https://exämple.com/", True),
        ("https://example.com:99999/", True),
        ("https://example.com:0/", True),
        ("http://169.254.169.254/latest/meta-data", True),
        ("http://127.0.0.1/", False),
        ("http://localhost:8000/", False),
        ("http://[::1]/", False),
        ("https://example.com/" + "a" * 2100, True),
    ],
)
def test_bad_receiver_urls_are_refused_naming_url(url: object, private_ok: bool) -> None:
    with pytest.raises(InvalidMessage) as exc:
        check_url(url, allow_private=private_ok)
    assert exc.value.field == "url"


def test_retry_verdicts() -> None:
    p = RetryPolicy(max_attempts=3)
    assert p.verdict(200, 1) == "delivered"
    assert p.verdict(204, 3) == "delivered"
    assert p.verdict(500, 1) == "retry"
    assert p.verdict(None, 2) == "retry"  # timeout or refused connection
    assert p.verdict(302, 1) == "retry"  # redirects are not followed
    assert p.verdict(500, 3) == "failed"
    assert p.verdict(410, 1) == "failed"  # gone for good


def test_retry_delays_grow_with_jitter_and_stop_at_the_cap() -> None:
    p = RetryPolicy(base_s=2.0, cap_s=60.0)
    assert p.delay_s(1, u=0.0) == 1.0 and p.delay_s(1, u=1.0) == 2.0
    assert p.delay_s(2, u=0.0) == 2.0 and p.delay_s(2, u=1.0) == 4.0
    assert p.delay_s(3, u=0.5) == 6.0
    assert p.delay_s(50, u=1.0) == 60.0 and p.delay_s(50, u=0.0) == 30.0
    draws = {round(p.delay_s(4), 6) for _ in range(50)}
    assert len(draws) > 10 and all(8.0 <= d <= 16.0 for d in draws)
