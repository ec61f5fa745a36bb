"""Event types and the patterns an endpoint subscribes with (pure)."""

from __future__ import annotations

import re
from fnmatch import fnmatchcase

from protocol.exceptions import InvalidMessage

# Every rollout timeline kind becomes ``rollout.<kind>`` (control_plane/rollout/machine.py
# and the controller); the others come from where their change happens.
ROLLOUT_KINDS = (
    "created",
    "started",
    "cohort",
    "gates_passed",
    "advanced",
    "completed",
    "failed",
    "paused",
    "resumed",
    "promoted",
    "aborted",
    "superseded",
    "set_aside",
    "recovered",
)
EVENT_TYPES = (
    *(f"rollout.{k}" for k in ROLLOUT_KINDS),
    "activation.failed",
    "agent.offline",
    "keyset.changed",
    "webhook.test",
)
MAX_PATTERNS = 32
_PATTERN = re.compile(r"[a-z_]+(\.([a-z_]+|\*))?|\*")


def rollout_type(kind: str) -> str:
    """The event type of a rollout timeline entry."""
    return f"rollout.{kind}"


def check_patterns(raw: object, field: str = "events") -> tuple[str, ...]:
    """The subscription patterns (``rollout.*``, ``agent.offline``, ``*``); raises
    InvalidMessage naming ``field`` when one is malformed or matches no known type."""
    if not isinstance(raw, list) or not raw:
        raise InvalidMessage(f"{field} must be a non-empty list of event types", field)
    if len(raw) > MAX_PATTERNS:
        raise InvalidMessage(f"{field} holds more than {MAX_PATTERNS} patterns", field)
    out: list[str] = []
    for p in raw:
        if not isinstance(p, str) or not _PATTERN.fullmatch(p):
            raise InvalidMessage(f"{field}: {str(p)[:40]!r} is not an event type or pattern", field)
        if not any(matches(p, t) for t in EVENT_TYPES):
            raise InvalidMessage(
                f"{field}: {p!r} matches no event type (known: {', '.join(EVENT_TYPES)})", field
            )
        if p not in out:
            out.append(p)
    return tuple(out)


def matches(pattern: str, event_type: str) -> bool:
    """Whether a subscription pattern covers an event type (``*`` within one part or all)."""
    return pattern == "*" or fnmatchcase(event_type, pattern)


def wanted(patterns: list[str] | tuple[str, ...], event_type: str) -> bool:
    """Whether any of an endpoint's patterns covers the type."""
    return any(matches(p, event_type) for p in patterns)
