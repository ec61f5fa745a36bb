"""RFC 3339 timestamps on the wire."""

from __future__ import annotations

from datetime import UTC, datetime

from protocol.exceptions import InvalidMessage


def format_time(t: datetime) -> str:
    """UTC, second precision with milliseconds, ``Z`` suffix."""
    return t.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(value: object, field: str) -> datetime:
    """Parse an RFC 3339 timestamp with a zone; raises InvalidMessage otherwise."""
    if not isinstance(value, str):
        raise InvalidMessage(f"{field} must be an RFC 3339 timestamp string", field)
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidMessage(f"{field} is not an RFC 3339 timestamp: {value!r}", field) from None
    if t.tzinfo is None:
        raise InvalidMessage(f"{field} must carry a time zone", field)
    return t.astimezone(UTC)
