"""Secrets are redacted from log records (control_plane/security/redact.py)."""

from __future__ import annotations

import logging

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
