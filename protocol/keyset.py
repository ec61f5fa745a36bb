"""The key set: a signed document that says which keys are trusted for what.

Modelled on The Update Framework's root metadata. Three roles, each a set of key ids and a
threshold:

- ``root`` signs key sets. A new version must be signed by a threshold of the root keys of the
  version before it *and* by a threshold of its own root keys, so the root can be rotated, and
  a stolen key that is no longer a root key cannot sign anything that is believed.
- ``publishers`` sign bundles; a bundle needs ``threshold`` distinct publisher signatures
  (k-of-n). Revoking a publisher is a new key set without its key.
- ``controlPlane`` signs desired-state documents. Rotating the control plane's key is a key
  set that lists the new key (beside the old one until every replica signs with the new).

Versions only go up, one at a time: a holder of version 3 accepts version 4, then 5, never 2
(rollback) and never 5 without 4 (each step is checked against the roots of the one before).
A key set carries an expiry, so one withheld forever cannot pass for the latest (freeze).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocol.dsse import (
    Envelope,
    key_id,
    load_public_key,
    parse_envelope,
    public_key_to_pem,
    sign,
    verify,
)
from protocol.exceptions import InvalidMessage, ReplayError, SignatureError
from protocol.fields import extra_fields, get_int, load_json_object, require_object
from protocol.timeutil import format_time, parse_time

KEYSET_PAYLOAD_TYPE = "application/vnd.modelfleet.keyset.v1+json"
ROLES = ("root", "publishers", "controlPlane")
MAX_KEYS = 256


@dataclass(frozen=True)
class Role:
    """Who may sign for one role: these key ids, at least ``threshold`` of them."""

    keyids: tuple[str, ...]
    threshold: int = 1

    def to_json(self) -> dict[str, object]:
        """JSON form."""
        return {"keyids": list(self.keyids), "threshold": self.threshold}


@dataclass(frozen=True)
class KeySet:
    """One version of the key set (its payload, not yet or already verified)."""

    version: int
    expires_at: datetime
    keys: Mapping[str, Ed25519PublicKey]
    roles: Mapping[str, Role]

    def trusted(self, role: str) -> dict[str, Ed25519PublicKey]:
        """The keys of ``role`` by key id."""
        return {kid: self.keys[kid] for kid in self.roles[role].keyids}

    def threshold(self, role: str) -> int:
        """How many of ``role``'s keys must sign."""
        return self.roles[role].threshold

    def to_json(self) -> dict[str, object]:
        """JSON form; keys as PEM."""
        return {
            "type": "keyset",
            "version": self.version,
            "expiresAt": format_time(self.expires_at),
            "keys": {
                kid: {"keytype": "ed25519", "publicKey": public_key_to_pem(k).decode()}
                for kid, k in sorted(self.keys.items())
            },
            "roles": {name: self.roles[name].to_json() for name in ROLES},
        }

    def to_bytes(self) -> bytes:
        """Canonical bytes, the payload that gets signed."""
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")).encode()

    def summary(self) -> dict[str, object]:
        """What an operator reads: version, expiry, each role's key ids and threshold."""
        return {
            "version": self.version,
            "expiresAt": format_time(self.expires_at),
            "roles": {name: self.roles[name].to_json() for name in ROLES},
        }


def make_keyset(
    version: int,
    expires_at: datetime,
    roots: Sequence[Ed25519PublicKey],
    publishers: Sequence[Ed25519PublicKey],
    control_plane: Sequence[Ed25519PublicKey],
    *,
    root_threshold: int = 1,
    publisher_threshold: int = 1,
) -> KeySet:
    """Build a key set from keys; raises InvalidMessage for a threshold no key set can meet."""
    keys: dict[str, Ed25519PublicKey] = {}
    roles = {}
    for name, members, threshold in (
        ("root", roots, root_threshold),
        ("publishers", publishers, publisher_threshold),
        ("controlPlane", control_plane, 1),
    ):
        ids = []
        for k in members:
            kid = key_id(k)
            keys[kid] = k
            if kid not in ids:
                ids.append(kid)
        roles[name] = _role(name, ids, threshold)
    return KeySet(version, expires_at, keys, roles)


def _role(name: str, keyids: list[str], threshold: int) -> Role:
    if not keyids:
        raise InvalidMessage(f"role {name} needs at least one key", f"roles.{name}.keyids")
    if not 1 <= threshold <= len(keyids):
        raise InvalidMessage(
            f"role {name} threshold {threshold} must be between 1 and its {len(keyids)} key(s)",
            f"roles.{name}.threshold",
        )
    return Role(tuple(keyids), threshold)


def keyset_from_json(doc: object) -> KeySet:
    """Validate a key set's decoded JSON; raises InvalidMessage naming the bad field."""
    d = require_object(doc, "keyset")
    if d.get("type") != "keyset":
        raise InvalidMessage("type must be 'keyset'", "type")
    version = get_int(d, "version", minimum=1)
    expires_at = parse_time(d.get("expiresAt"), "expiresAt")
    raw_keys = require_object(d.get("keys"), "keys")
    if len(raw_keys) > MAX_KEYS:
        raise InvalidMessage(f"keys lists more than {MAX_KEYS} keys", "keys")
    keys: dict[str, Ed25519PublicKey] = {}
    for kid, entry in raw_keys.items():
        e = require_object(entry, f"keys.{kid}")
        if e.get("keytype") != "ed25519":
            raise InvalidMessage("keytype must be 'ed25519'", f"keys.{kid}.keytype")
        pem = e.get("publicKey")
        if not isinstance(pem, str):
            raise InvalidMessage("publicKey must be a PEM string", f"keys.{kid}.publicKey")
        key = load_public_key(pem.encode())
        if key_id(key) != kid:
            raise InvalidMessage(f"key id {kid[:16]} is not the key's id", f"keys.{kid}")
        keys[kid] = key
    raw_roles = require_object(d.get("roles"), "roles")
    unknown = sorted(set(raw_roles) - set(ROLES))
    if unknown:
        raise InvalidMessage(f"unknown role(s): {', '.join(unknown)}", "roles")
    roles = {}
    for name in ROLES:
        r = require_object(raw_roles.get(name), f"roles.{name}")
        ids = r.get("keyids")
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise InvalidMessage("keyids must be a list of key ids", f"roles.{name}.keyids")
        if len(set(ids)) != len(ids):
            raise InvalidMessage("keyids lists a key twice", f"roles.{name}.keyids")
        for kid in ids:
            if kid not in keys:
                raise InvalidMessage(f"key id {kid[:16]} is not in keys", f"roles.{name}.keyids")
        roles[name] = _role(name, ids, get_int(r, "threshold", f"roles.{name}.", minimum=1))
    if extra_fields(d, ("type", "version", "expiresAt", "keys", "roles")):
        raise InvalidMessage("key set has unknown fields", "keyset")
    return KeySet(version, expires_at, keys, roles)


def sign_keyset(keyset: KeySet, root_keys: Iterable[Ed25519PrivateKey]) -> Envelope:
    """Sign a key set with root keys (those of the version before and of this one)."""
    return sign(KEYSET_PAYLOAD_TYPE, keyset.to_bytes(), list(root_keys))


def _payload(envelope: Envelope) -> KeySet:
    if envelope.payload_type != KEYSET_PAYLOAD_TYPE:
        raise SignatureError(
            f"payload type is {envelope.payload_type!r}, expected {KEYSET_PAYLOAD_TYPE!r}"
        )
    return keyset_from_json(load_json_object(envelope.payload, "key set"))


def _signed_by(envelope: Envelope, ks: KeySet, which: str) -> None:
    try:
        verify(envelope, ks.trusted("root"), KEYSET_PAYLOAD_TYPE, ks.threshold("root"))
    except SignatureError as exc:
        raise SignatureError(f"key set not signed by {which} root keys: {exc}") from None


def open_first(envelope_bytes: bytes, now: datetime) -> KeySet:
    """The first key set one trusts: it must be signed by a threshold of its own root keys
    and not have expired. Where it came from is what makes it trusted (a file on the
    server, the enrollment answer over TLS); raises a ProtocolError."""
    envelope = parse_envelope(envelope_bytes)
    ks = _payload(envelope)
    _signed_by(envelope, ks, "its own")
    if now >= ks.expires_at:
        raise ReplayError(f"key set version {ks.version} expired at {format_time(ks.expires_at)}")
    return ks


def next_keyset(trusted: KeySet, envelope_bytes: bytes, now: datetime) -> KeySet:
    """The version after ``trusted`` if it is validly signed; raises a ProtocolError.

    It must be exactly version ``trusted.version + 1``, signed by a threshold of the trusted
    root keys and a threshold of its own, and not expired.
    """
    envelope = parse_envelope(envelope_bytes)
    ks = _payload(envelope)
    if ks.version <= trusted.version:
        raise ReplayError(
            f"key set version {ks.version} is not newer than the trusted version {trusted.version}"
        )
    if ks.version != trusted.version + 1:
        raise InvalidMessage(
            f"key set version {ks.version} skips versions after {trusted.version}", "version"
        )
    _signed_by(envelope, trusted, f"version {trusted.version}'s")
    _signed_by(envelope, ks, "its own")
    if now >= ks.expires_at:
        raise ReplayError(f"key set version {ks.version} expired at {format_time(ks.expires_at)}")
    return ks


def follow_chain(
    trusted: KeySet | None, envelopes: Sequence[bytes], now: datetime
) -> tuple[KeySet | None, int]:
    """Apply versions in order from ``trusted``; return (newest trusted, how many applied).

    Intermediate versions may have expired since (only the newest has to be current);
    raises a ProtocolError at the first one that does not follow.
    """
    current, applied = trusted, 0
    for i, raw in enumerate(envelopes):
        last = i == len(envelopes) - 1
        # An older step is checked for signatures and order; only the newest must be current.
        when = now if last else datetime.min.replace(tzinfo=now.tzinfo)
        current = open_first(raw, when) if current is None else next_keyset(current, raw, when)
        applied += 1
    return current, applied
