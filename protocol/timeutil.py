"""RFC 3339 timestamps on the wire."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from protocol.exceptions import InvalidMessage

# Instants a timestamp on the wire may name. The lower bound lets a device whose clock was reset
# to the epoch still report; the upper one leaves any duration the code adds to a timestamp
# (expiries, windows, retention) thousands of years before datetime's year 9999 overflows.
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(3000, 1, 1, tzinfo=UTC)
# RFC 3339's date-time (a space for "T" as its section 5.6 note allows); fractions to 9 digits.
_RFC3339_RE = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})"
)


def format_time(t: datetime) -> str:
    """UTC, second precision with milliseconds, ``Z`` suffix."""
    return t.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(value: object, field: str) -> datetime:
    """Parse an RFC 3339 timestamp with a zone, in [EARLIEST, LATEST); raises InvalidMessage."""
    if not isinstance(value, str):
        raise InvalidMessage(f"{field} must be an RFC 3339 timestamp string", field)
    m = _RFC3339_RE.fullmatch(value) if len(value) <= 40 else None
    if m is None:
        raise InvalidMessage(f"{field} is not an RFC 3339 timestamp with a zone", field)
    fraction = m.group(1) or ""
    # datetime holds microseconds: digits past the sixth are dropped, not refused.
    text = value.replace(fraction, fraction[:7], 1) if len(fraction) > 7 else value
    try:
        t = datetime.fromisoformat(text.upper().replace("Z", "+00:00")).astimezone(UTC)
    except (ValueError, OverflowError):
        # A day or hour out of range, or an offset that moves the instant past year 1 or 9999.
        raise InvalidMessage(f"{field} is not a valid instant: {value!r}", field) from None
    if not EARLIEST <= t < LATEST:
        raise InvalidMessage(
            f"{field} must be between {format_time(EARLIEST)} and {format_time(LATEST)}", field
        )
    return t
