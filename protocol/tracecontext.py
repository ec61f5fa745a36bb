"""W3C Trace Context ``traceparent`` values: read as hostile input, written canonically.

A rollout decision's trace context travels inside the signed desired state, so that the agent's
update spans join the control plane's trace (docs/adr/0023-opentelemetry.md). The value is
``VERSION-TRACEID-PARENTID-FLAGS`` in lowercase hex (https://www.w3.org/TR/trace-context/):
version ``00`` has exactly these four fields; a higher version may append fields after a
dash, which a reader of version 00 ignores; version ``ff``, an all-zero trace id or parent id
and uppercase hex are invalid. A reader that finds an invalid value ignores it (``None``): a
trace context is never a reason to refuse the document that carries it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_TRACEPARENT_LEN = 256  # a future version may append fields; nothing needs more than this
_V00 = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_FUTURE = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?", re.S)


@dataclass(frozen=True)
class TraceParent:
    """A span's place in a trace: trace id (32 hex), span id (16 hex), sampled or not."""

    trace_id: str
    span_id: str
    sampled: bool

    def header(self) -> str:
        """The value as written (version 00)."""
        return f"00-{self.trace_id}-{self.span_id}-{'01' if self.sampled else '00'}"


def parse_traceparent(value: object) -> TraceParent | None:
    """A well-formed ``traceparent``, or None for anything else (wrong type, length, case,
    version ff, all-zero ids, trailing data on version 00)."""
    if not isinstance(value, str) or len(value) > MAX_TRACEPARENT_LEN or not value.isascii():
        return None
    m = _V00.fullmatch(value)
    if m is None:
        future = _FUTURE.fullmatch(value)
        # A version above 00 is read as 00 (its first four fields); version ff is invalid.
        if future is None or future[1] in ("00", "ff"):
            return None
        trace_id, span_id, flags = future[2], future[3], future[4]
    else:
        trace_id, span_id, flags = m[1], m[2], m[3]
    if trace_id == "0" * 32 or span_id == "0" * 16:
        return None
    return TraceParent(trace_id, span_id, bool(int(flags, 16) & 1))


def checked_traceparent(value: object) -> str | None:
    """The canonical form of a well-formed ``traceparent``; None when absent or malformed."""
    parsed = parse_traceparent(value)
    return None if parsed is None else parsed.header()
