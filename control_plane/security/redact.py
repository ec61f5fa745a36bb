"""Secrets never reach a log line: a logging filter that redacts them from every record.

What is redacted, wherever it appears in a message, its arguments, an exception's text or a
stack: every secret of a shape protocol/redaction.py knows (bearer tokens, the project's
prefixed secrets, the value after a key that names a secret, a password in a URL; the agent's
diagnostics use the same list), and any exact string registered with :func:`add_secret` (the
control plane's own broker password, whose shape is not known in advance).

``install()`` puts the filter on every handler of the root logger, where it sees the records
of every logger (a filter on a logger would miss its children's). The server calls it at
start and the CLI after it sets up logging; calling it again adds nothing.
"""

from __future__ import annotations

import logging

from protocol.redaction import MASK
from protocol.redaction import redact as redact_shapes

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
    return redact_shapes(text)


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
