"""Desired state: what one agent should run, signed by the control plane.

The trust rules live here as a pure function so both the tests and the agent use the same code:
the signature must be by the control plane's key, the document must be for this agent, its
generation must not go down, and it must not have expired.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocol.digest import check_digest, sha256_digest
from protocol.dsse import DESIRED_PAYLOAD_TYPE, Envelope, parse_envelope, sign, verify
from protocol.exceptions import InvalidMessage, ReplayError
from protocol.fields import (
    check_json,
    extra_fields,
    get_int,
    get_list,
    load_json_object,
    req_str,
    require_object,
)
from protocol.manifest import check_name, check_version
from protocol.timeutil import format_time, parse_time
from protocol.tracecontext import checked_traceparent

# A model's merged configuration, as signed into the desired state: bounded like any message.
MAX_CONFIG_BYTES = 64 * 1024
MAX_CONFIG_DEPTH = 8


def config_digest(config: Mapping[str, Any]) -> str:
    """The digest of a configuration: sha256 of its canonical JSON (sorted keys, no spaces).

    The agent reports the digest of the configuration it applied; the control plane compares
    it with the one it signed.
    """
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return sha256_digest(canonical.encode())


def check_config(doc: object, field_name: str = "config") -> dict[str, Any]:
    """A configuration object within its bounds; raises InvalidMessage naming the field."""
    d = require_object(doc, field_name)
    check_json(d, field_name, max_depth=MAX_CONFIG_DEPTH)
    size = len(json.dumps(d, separators=(",", ":")))
    if size > MAX_CONFIG_BYTES:
        raise InvalidMessage(
            f"{field_name} is {size} bytes of JSON, over {MAX_CONFIG_BYTES}", field_name
        )
    return d


@dataclass(frozen=True)
class Shadow:
    """The version a rollout replaces, kept loaded to score a sample of live requests."""

    version: str
    manifest_digest: str
    sample: float

    def to_json(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "version": self.version,
            "manifestDigest": self.manifest_digest,
            "sample": self.sample,
        }


@dataclass(frozen=True)
class DesiredModel:
    """One model version an agent should run."""

    name: str
    version: str
    manifest_digest: str
    # Set by the control plane when it orders a return to a lower version on purpose; without
    # it an agent refuses to go below the highest version it has activated.
    rollback: bool = False
    shadow: Shadow | None = None
    # The merged configuration of this model on this agent (None: the bundle's defaults, as
    # before configuration existed); signed with its digest, which the agent reports back.
    config: Mapping[str, Any] | None = field(default=None, hash=False)
    # The W3C trace context of the decision that put this entry here (the control plane's
    # desired-state span): the agent's update spans are its children. Not part of what the
    # entry means: two entries that differ only in it are the same order.
    traceparent: str | None = field(default=None, compare=False)
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def config_digest(self) -> str | None:
        """The digest of ``config``, None without one."""
        return None if self.config is None else config_digest(self.config)

    @property
    def serving_key(self) -> str:
        """What identifies this version with this configuration: two desired models with the
        same key serve the same way (the manifest digest alone without a configuration)."""
        digest = self.config_digest
        return self.manifest_digest if digest is None else f"{self.manifest_digest}+{digest}"

    def to_json(self) -> dict[str, Any]:
        """JSON form, unknown fields kept."""
        doc = {
            **self.extra,
            "name": self.name,
            "version": self.version,
            "manifestDigest": self.manifest_digest,
        }
        if self.rollback:
            doc["rollback"] = True
        if self.shadow is not None:
            doc["shadow"] = self.shadow.to_json()
        if self.config is not None:
            doc["config"] = dict(self.config)
            doc["configDigest"] = config_digest(self.config)
        if self.traceparent is not None:
            doc["traceparent"] = self.traceparent
        return doc


@dataclass(frozen=True)
class DesiredState:
    """The whole desired state of one agent at one generation."""

    agent_id: str
    generation: int
    issued_at: datetime
    expires_at: datetime
    models: tuple[DesiredModel, ...]
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_json(self) -> dict[str, Any]:
        """JSON form, unknown fields kept."""
        return {
            **self.extra,
            "agentId": self.agent_id,
            "generation": self.generation,
            "issuedAt": format_time(self.issued_at),
            "expiresAt": format_time(self.expires_at),
            "models": [m.to_json() for m in self.models],
        }

    def to_bytes(self) -> bytes:
        """Canonical bytes, the payload that gets signed."""
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")).encode()

    def sign(self, key: Ed25519PrivateKey) -> Envelope:
        """Sign with the control plane's key."""
        return sign(DESIRED_PAYLOAD_TYPE, self.to_bytes(), [key])


def _get_bool(d: dict, key: str, prefix: str) -> bool:
    value = d.get(key, False)
    if not isinstance(value, bool):
        raise InvalidMessage(f"{prefix}{key} must be true or false", f"{prefix}{key}")
    return value


def _shadow(doc: object, prefix: str) -> Shadow | None:
    if doc is None:
        return None
    d = require_object(doc, prefix.rstrip("."))
    sample = d.get("sample")
    if isinstance(sample, bool) or not isinstance(sample, int | float) or not 0 < sample <= 1:
        raise InvalidMessage(f"{prefix}sample must be in (0, 1]", f"{prefix}sample")
    return Shadow(
        version=check_version(req_str(d, "version", prefix), f"{prefix}version"),
        manifest_digest=check_digest(d.get("manifestDigest"), f"{prefix}manifestDigest"),
        sample=float(sample),
    )


def _config(md: dict, prefix: str) -> dict[str, Any] | None:
    if md.get("config") is None:
        if md.get("configDigest") is not None:
            raise InvalidMessage(f"{prefix}configDigest without {prefix}config", f"{prefix}config")
        return None
    config = check_config(md["config"], f"{prefix}config")
    digest = check_digest(md.get("configDigest"), f"{prefix}configDigest")
    if digest != config_digest(config):
        raise InvalidMessage(
            f"{prefix}configDigest does not match {prefix}config", f"{prefix}configDigest"
        )
    return config


KNOWN_MODEL_FIELDS = (
    "name",
    "version",
    "manifestDigest",
    "rollback",
    "shadow",
    "config",
    "configDigest",
    "traceparent",
)


def desired_from_json(doc: object) -> DesiredState:
    """Validate decoded JSON; raises InvalidMessage naming the bad field."""
    d = require_object(doc, "desired")
    models = []
    seen = set()
    for i, m in enumerate(get_list(d, "models")):
        p = f"models[{i}]."
        md = require_object(m, p.rstrip("."))
        name = check_name(req_str(md, "name", p), f"{p}name")
        if name in seen:
            raise InvalidMessage(f"model {name!r} is listed twice", f"{p}name")
        seen.add(name)
        models.append(
            DesiredModel(
                name=name,
                version=check_version(req_str(md, "version", p), f"{p}version"),
                manifest_digest=check_digest(md.get("manifestDigest"), f"{p}manifestDigest"),
                rollback=_get_bool(md, "rollback", p),
                shadow=_shadow(md.get("shadow"), f"{p}shadow."),
                config=_config(md, p),
                # Hostile even when signed: a malformed value is dropped, never a refusal.
                traceparent=checked_traceparent(md.get("traceparent")),
                extra=extra_fields(md, KNOWN_MODEL_FIELDS),
            )
        )
    return DesiredState(
        agent_id=req_str(d, "agentId"),
        generation=get_int(d, "generation"),
        issued_at=parse_time(d.get("issuedAt"), "issuedAt"),
        expires_at=parse_time(d.get("expiresAt"), "expiresAt"),
        models=tuple(models),
        extra=extra_fields(d, ("agentId", "generation", "issuedAt", "expiresAt", "models")),
    )


def accept_desired(
    envelope_bytes: bytes,
    control_plane_keys: Mapping[str, Ed25519PublicKey],
    agent_id: str,
    highest_generation: int,
    now: datetime,
    *,
    allow_expired: bool = False,
) -> DesiredState | None:
    """Verify a desired-state envelope for this agent.

    Returns the state when its generation is newer than ``highest_generation``, None when it is
    the same generation (nothing to do). Raises SignatureError when not signed by the control
    plane, InvalidMessage when malformed or addressed to another agent, and ReplayError when
    its generation went down or it has expired. ``allow_expired`` is for an agent restarting
    from the document it had already accepted: it keeps serving it (and reports itself stale).
    """
    envelope = parse_envelope(envelope_bytes)
    payload, _ = verify(envelope, control_plane_keys, DESIRED_PAYLOAD_TYPE)
    state = desired_from_json(load_json_object(payload, "desired state"))
    if state.agent_id != agent_id:
        raise InvalidMessage(
            f"desired state is for agent {state.agent_id!r}, not {agent_id!r}", "agentId"
        )
    if state.generation < highest_generation:
        raise ReplayError(
            f"desired state generation {state.generation} is older than "
            f"{highest_generation}, already accepted"
        )
    if now >= state.expires_at and not allow_expired:
        raise ReplayError(f"desired state expired at {format_time(state.expires_at)}")
    if state.generation == highest_generation:
        return None
    return state
