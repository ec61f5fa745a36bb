"""Secrets are redacted from log records (control_plane/security/redact.py)."""

from __future__ import annotations

import logging
import time

import pytest

from control_plane.security import auth, redact
from protocol.redaction import SECRET_PREFIXES


def test_prefixes_are_the_ones_auth_issues() -> None:
    assert set(SECRET_PREFIXES) == {
        auth.API_TOKEN_PREFIX,
        auth.AGENT_CREDENTIAL_PREFIX,
        auth.ENROLLMENT_TOKEN_PREFIX,
        auth.WEBHOOK_SECRET_PREFIX,
    }


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("Authorization: Bearer abc.def-ghi", "abc.def-ghi"),
        ("b'Bearer mfa_0123456789abcdef...'", "0123456789abcdef"),
        ("refused mfc_Zm9vYmFyYmF6cXV4 from 10.0.0.1", "Zm9vYmFyYmF6cXV4"),
        ('{"token": "mfe_AAAAbbbbCCCC", "labels": {}}', "AAAAbbbbCCCC"),
        ('{"password": "s3cr3t-pw", "username": "a1"}', "s3cr3t-pw"),
        ("connect password=hunter22&user=x", "hunter22"),
        ("broker mqtt://cp:topsecret@127.0.0.1:1883 down", "topsecret"),
        ("credential: qwertyuiop", "qwertyuiop"),
        # Found by the attacker's pass (issue 17): key names with a prefix or suffix, quoted
        # values with spaces, Basic credentials, API keys and PEM private keys slipped through.
        ("GET https://cp/x?access_token=tok3nV4lue&y=1 failed", "tok3nV4lue"),
        ("client_secret=cl1entS3cret", "cl1entS3cret"),
        ("AWS_SECRET_ACCESS_KEY=AKIAw5ecret", "AKIAw5ecret"),
        ("mqttToken: mq77token", "mq77token"),
        ("api_key=ap1keyvalue", "ap1keyvalue"),
        ("X-Api-Key: ap1keyheader", "ap1keyheader"),
        ("passphrase=pa55phrase", "pa55phrase"),
        ('password = "two words"', "words"),
        ("Authorization: Basic YWxhZGRpbjpvcGVuc2VzYW1l", "YWxhZGRpbjpvcGVuc2VzYW1l"),
        (
            "key:\n-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIPr1v4te\n"
            "-----END PRIVATE KEY-----\n",
            "MC4CAQAwBQYDK2VwBCIEIPr1v4te",
        ),
        (
            "cut short: -----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAAB",
            "b3BlbnNzaC1rZXktdjEAAAAAB",
        ),
    ],
)
def test_secrets_are_redacted(text: str, secret: str) -> None:
    out = redact.redact(text)
    assert secret not in out and redact.MASK in out


def test_ordinary_text_is_left_alone() -> None:
    text = "enrolled agent 1b2c (edge-1) labels={'site': 'a'} on GET /api/v1/fleet"
    assert redact.redact(text) == text


def test_filter_redacts_message_arguments_and_exceptions() -> None:
    redact.add_secret("Broker-Pass-123")
    logger = logging.getLogger("test.redact")
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    logger.addHandler(handler)
    logger.propagate = False
    try:
        redact.install(logger)
        redact.install(logger)  # idempotent
        assert sum(isinstance(f, redact.RedactingFilter) for f in handler.filters) == 1
        logger.warning("token %s and %s", "mfa_Secret0123", "Broker-Pass-123")
        try:
            raise ValueError("header was Bearer mfc_LeakedCredential")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    text = records[0].getMessage() + records[1].getMessage() + (records[1].exc_text or "")
    for secret in ("Secret0123", "Broker-Pass-123", "LeakedCredential"):
        assert secret not in text
    assert "ValueError" in (records[1].exc_text or "")


@pytest.mark.parametrize("unit", ["a-", "a.", "x_token-", "http-"])
def test_hostile_text_is_redacted_in_linear_time(unit: str) -> None:
    # Every log record passes here, text an agent or a client chose among it: a key name or a
    # URL scheme read from every position made a 64 KiB line of 'a-a-a-...' take ~10 s.
    text = unit * (64 * 1024 // len(unit))
    started = time.perf_counter()
    redact.redact(text)
    assert time.perf_counter() - started < 1.0
