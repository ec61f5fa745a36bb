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
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocol.digest import is_digest, sha256_digest
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
_COUNT = re.compile(r"[0-9]{1,10}")  # ASCII digits only: str.isdigit() takes "²"
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
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


# ----------------------------------------------------------------------------- answers on MQTT
# An answer travels on the agent's own ``commands/answer`` topic in chunks of at most
# ANSWER_CHUNK_BYTES, each carrying (as MQTT 5 user properties) the command id, its index, the
# count, and the whole answer's size and digest; or one empty chunk carrying ``error``.
ANSWER_CHUNK_BYTES = 128 * 1024
MAX_ANSWER_CHUNKS = -(-MAX_ANSWER_BYTES // ANSWER_CHUNK_BYTES)
MAX_ERROR_CHARS = 500


@dataclass(frozen=True, kw_only=True)
class AnswerChunk:
    """One piece of an answer, checked on its own."""

    command_id: str
    index: int
    count: int
    size: int
    digest: str
    data: bytes
    error: str | None = None


def answer_chunks(command_id: str, data: bytes, error: str | None = None) -> list[AnswerChunk]:
    """An answer cut into chunks (one empty chunk for an error or an empty answer)."""
    digest = sha256_digest(data)
    pieces = [data[i : i + ANSWER_CHUNK_BYTES] for i in range(0, len(data), ANSWER_CHUNK_BYTES)]
    pieces = pieces or [b""]
    return [
        AnswerChunk(
            command_id=command_id,
            index=i,
            count=len(pieces),
            size=len(data),
            digest=digest,
            data=piece,
            error=error[:MAX_ERROR_CHARS] if error is not None else None,
        )
        for i, piece in enumerate(pieces)
    ]


def chunk_properties(chunk: AnswerChunk) -> list[tuple[str, str]]:
    """The user properties that carry a chunk's header."""
    props = [
        ("commandId", chunk.command_id),
        ("index", str(chunk.index)),
        ("count", str(chunk.count)),
        ("size", str(chunk.size)),
        ("digest", chunk.digest),
    ]
    return props + ([("error", chunk.error)] if chunk.error is not None else [])


def _count(props: Mapping[str, str], key: str, maximum: int) -> int:
    value = props.get(key)
    if not isinstance(value, str) or not _COUNT.fullmatch(value):
        raise InvalidMessage(f"{key} must be a count", key)
    n = int(value)
    if n > maximum:
        raise InvalidMessage(f"{key} must be <= {maximum}", key)
    return n


def parse_answer_chunk(props: Mapping[str, str], payload: bytes) -> AnswerChunk:
    """A chunk from its user properties and payload; raises InvalidMessage naming the field."""
    command_id = props.get("commandId")
    if not isinstance(command_id, str) or not _UUID.fullmatch(command_id):
        raise InvalidMessage("commandId must be a command id (a UUID)", "commandId")
    count = _count(props, "count", MAX_ANSWER_CHUNKS)
    index = _count(props, "index", MAX_ANSWER_CHUNKS)
    size = _count(props, "size", MAX_ANSWER_BYTES)
    if not 0 <= index < count:
        raise InvalidMessage(f"index must be below count ({count})", "index")
    if len(payload) > ANSWER_CHUNK_BYTES:
        raise InvalidMessage(f"a chunk holds at most {ANSWER_CHUNK_BYTES} bytes", "payload")
    if count != max(1, -(-size // ANSWER_CHUNK_BYTES)):
        raise InvalidMessage(f"count {count} does not fit size {size}", "count")
    if not is_digest(props.get("digest")):
        raise InvalidMessage("digest must be sha256:<64 hex>", "digest")
    error = props.get("error")
    if error is not None and (len(error) > MAX_ERROR_CHARS or size or count != 1):
        raise InvalidMessage("an error is one empty chunk of at most 500 characters", "error")
    return AnswerChunk(
        command_id=command_id,
        index=index,
        count=count,
        size=size,
        digest=str(props["digest"]),
        data=bytes(payload),
        error=error,
    )


class AnswerAssembly:
    """The chunks of one answer as they come, in any order, repeats allowed.

    Pure and bounded: every chunk must agree with the first on count, size and digest, and
    the whole is at most ``max_bytes``; :meth:`add` returns the answer once it is whole and its
    digest checks, and raises InvalidMessage for a chunk that does not fit.
    """

    def __init__(self, first: AnswerChunk, max_bytes: int) -> None:
        if first.size > max_bytes:
            raise InvalidMessage(f"the answer is over the command's maxBytes ({max_bytes})", "size")
        self.command_id = first.command_id
        self.count, self.size, self.digest = first.count, first.size, first.digest
        self.error = first.error
        self._parts: dict[int, bytes] = {}

    def add(self, chunk: AnswerChunk) -> bytes | None:
        """Take a chunk; the whole answer when it is complete, else None."""
        if (chunk.command_id, chunk.count, chunk.size, chunk.digest, chunk.error) != (
            self.command_id,
            self.count,
            self.size,
            self.digest,
            self.error,
        ):
            raise InvalidMessage("the chunk disagrees with the answer's first chunk", "digest")
        expected = min(ANSWER_CHUNK_BYTES, self.size - chunk.index * ANSWER_CHUNK_BYTES)
        if len(chunk.data) != max(expected, 0):
            raise InvalidMessage(f"chunk {chunk.index} must hold {expected} bytes", "payload")
        self._parts[chunk.index] = chunk.data
        if len(self._parts) < self.count:
            return None
        data = b"".join(self._parts[i] for i in range(self.count))
        if sha256_digest(data) != self.digest:
            raise InvalidMessage("the answer does not match its digest", "digest")
        return data


def unseen_lines(previous: list[str], current: list[str]) -> list[str]:
    """The lines of ``current`` that follow what ``previous`` already showed.

    Log answers are windows over an append-only ring, so a later window starts inside or after
    an earlier one: the longest tail of ``previous`` that ``current`` starts with was shown.
    """
    for k in range(min(len(previous), len(current)), 0, -1):
        if previous[-k:] == current[:k]:
            return current[k:]
    return current
