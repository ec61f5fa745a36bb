"""Secrets never reach a log line: a logging filter that redacts them from every record.

What is redacted, wherever it appears in a message, its arguments, an exception's text or a
stack: ``Bearer <anything>``; API tokens, agent credentials, enrollment tokens and webhook
secrets by their prefixes (``mfa_``, ``mfc_``, ``mfe_``, ``mfw_``, see
``control_plane/security/auth.py``); the value after a key that names a secret
(``password=…``, ``"credential": "…"``, ``token: …``); a password in a URL
(``mqtt://user:pw@host``); and any exact string registered with :func:`add_secret` (the
control plane's own broker password, whose shape is not known in advance).

``install()`` puts the filter on every handler of the root logger, where it sees the records
of every logger (a filter on a logger would miss its children's). The server calls it at
start and the CLI after it sets up logging; calling it again adds nothing.
"""

from __future__ import annotations

import logging
import re

MASK = "[redacted]"
# The prefixes of control_plane/security/auth.py (API_TOKEN_PREFIX, AGENT_CREDENTIAL_PREFIX,
# ENROLLMENT_TOKEN_PREFIX, WEBHOOK_SECRET_PREFIX); tests/unit/test_redact.py holds the two
# lists together.
SECRET_PREFIXES = ("mfa_", "mfc_", "mfe_", "mfw_")

_PATTERNS = (
    # A bearer token, also cut short (aiohttp quotes a header's first 100 bytes).
    (re.compile(r"(?i)(bearer\s+)[^\s'\"\\,;]+"), rf"\g<1>{MASK}"),
    (re.compile(r"\b(" + "|".join(SECRET_PREFIXES) + r")[A-Za-z0-9_\-]+"), rf"\g<1>{MASK}"),
    # key=value, key: value, "key": "value" for keys that name a secret.
    (
        re.compile(r"""(?ix)
        (["']?\b(?:[a-z_]*password|passwd|secret|credential|token|authorization)["']?
         \s*[:=]\s*["']?)
        (?!\[redacted\])[^\s'"&,;}]+"""),
        rf"\g<1>{MASK}",
    ),
    # scheme://user:password@host
    (re.compile(r"(\b[a-z][a-z0-9+.\-]*://[^/\s:@]+:)[^/\s@]+@", re.I), rf"\g<1>{MASK}@"),
)
_known: set[str] = set()


def add_secret(value: str | None) -> None:
    """Redact this exact string from now on (ignored when empty or too short to matter)."""
    if value and len(value) >= 6:
        _known.add(value)


def redact(text: str) -> str:
    """``text`` with every secret it contains replaced by ``[redacted]``."""
    for secret in _known:
        if secret in text:
            text = text.replace(secret, MASK)
    for pattern, repl in _PATTERNS:
        text = pattern.sub(repl, text)
    return text


class RedactingFilter(logging.Filter):
    """Rewrites each record's message (arguments merged in) and exception text, redacted."""

    _formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        """Redact in place; never drops a record."""
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # arguments that do not fit the format
            message = f"{record.msg!r} {record.args!r}"
        record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = self._formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def install(logger: logging.Logger | None = None) -> None:
    """Put one :class:`RedactingFilter` on every handler of ``logger`` (default: the root)."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
