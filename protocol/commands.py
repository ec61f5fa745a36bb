"""Operator commands to one agent (issue 17, remote diagnostics): signed, expiring documents.

An agent only makes outbound connections, so the control plane cannot ask it anything; it
leaves a command where the agent already looks (an HTTP long-poll, its MQTT topic) and the
agent uploads the answer. The command is signed by the control plane's key like the desired
state, so a broker or proxy that forges or replays one is refused:

- the signature must be by the control plane's key, with this module's payload type (a signed
  desired state is not a command);
- it must be addressed to this agent, and not be expired (``expiresAt``), nor issued in the
  future beyond a small skew;
- its id must not have been seen before (the caller keeps the ids until they expire).

Pure: bytes and values in, values or exceptions out.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocol.dsse import Envelope, parse_envelope, sign, verify
from protocol.exceptions import InvalidMessage, ReplayError
from protocol.fields import extra_fields, get_int, load_json_object, req_str, require_object
from protocol.timeutil import format_time, parse_time

COMMAND_PAYLOAD_TYPE = "application/vnd.modelfleet.command.v1+json"
KINDS = ("logs", "diagnose")
MAX_TTL = timedelta(minutes=15)
CLOCK_SKEW = timedelta(minutes=5)
MAX_ANSWER_BYTES = 8 * 1024 * 1024  # the most an answer may hold, whatever a command asks
MAX_SINCE_S = 7 * 86400
FIELDS = ("agentId", "commandId", "kind", "issuedAt", "expiresAt", "sinceSeconds", "maxBytes")


@dataclass(frozen=True, kw_only=True)
class Command:
    """One command for one agent: what to send (``kind``), over which window, up to what size."""

    agent_id: str
    command_id: str
    kind: str
    issued_at: datetime
    expires_at: datetime
    since_s: int = 600
    max_bytes: int = 1024 * 1024
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_json(self) -> dict[str, Any]:
        """JSON form, unknown fields kept."""
        return {
            **self.extra,
            "agentId": self.agent_id,
            "commandId": self.command_id,
            "kind": self.kind,
            "issuedAt": format_time(self.issued_at),
            "expiresAt": format_time(self.expires_at),
            "sinceSeconds": self.since_s,
            "maxBytes": self.max_bytes,
        }

    def to_bytes(self) -> bytes:
        """Canonical bytes, the payload that gets signed."""
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")).encode()

    def sign(self, key: Ed25519PrivateKey) -> Envelope:
        """Sign with the control plane's key."""
        return sign(COMMAND_PAYLOAD_TYPE, self.to_bytes(), [key])


def command_from_json(doc: object) -> Command:
    """Validate a command document; raises InvalidMessage naming the bad field."""
    d = require_object(doc, "command")
    kind = req_str(d, "kind", max_len=32)
    if kind not in KINDS:
        raise InvalidMessage(f"kind must be one of {KINDS}, got {kind[:32]!r}", "kind")
    issued = parse_time(req_str(d, "issuedAt", max_len=40), "issuedAt")
    expires = parse_time(req_str(d, "expiresAt", max_len=40), "expiresAt")
    if not issued < expires <= issued + MAX_TTL:
        raise InvalidMessage(
            f"expiresAt must be after issuedAt and within {MAX_TTL.total_seconds():.0f}s",
            "expiresAt",
        )
    since = get_int(d, "sinceSeconds", minimum=1, maximum=MAX_SINCE_S)
    max_bytes = get_int(d, "maxBytes", minimum=1024, maximum=MAX_ANSWER_BYTES)
    return Command(
        agent_id=req_str(d, "agentId", max_len=64),
        command_id=req_str(d, "commandId", max_len=64),
        kind=kind,
        issued_at=issued,
        expires_at=expires,
        since_s=since,
        max_bytes=max_bytes,
        extra=extra_fields(d, FIELDS),
    )


def accept_command(
    envelope_bytes: bytes,
    control_plane_keys: Mapping[str, Ed25519PublicKey],
    agent_id: str,
    now: datetime,
    seen: frozenset[str] | set[str] = frozenset(),
) -> Command:
    """Verify a command envelope for this agent and return the command.

    Raises SignatureError when not signed by the control plane (or not a command),
    InvalidMessage when malformed or addressed to another agent, and ReplayError when expired,
    issued too far in the future, or already seen.
    """
    envelope = parse_envelope(envelope_bytes)
    payload, _ = verify(envelope, control_plane_keys, COMMAND_PAYLOAD_TYPE)
    cmd = command_from_json(load_json_object(payload, "command"))
    if cmd.agent_id != agent_id:
        raise InvalidMessage(f"command is for agent {cmd.agent_id!r}, not {agent_id!r}", "agentId")
    if now >= cmd.expires_at:
        raise ReplayError(f"command {cmd.command_id} expired at {format_time(cmd.expires_at)}")
    if cmd.issued_at > now + CLOCK_SKEW:
        raise ReplayError(f"command {cmd.command_id} is issued in the future")
    if cmd.command_id in seen:
        raise ReplayError(f"command {cmd.command_id} was already carried out")
    return cmd
