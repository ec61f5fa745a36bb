"""The next key set version from a requested change (pure): which keys each role gains and
loses, and its threshold. ``modelfleet keys rotate`` resolves its arguments (key files, ids,
id prefixes) into a :class:`KeySetChange` and signs what :func:`next_version` returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from protocol.dsse import key_id
from protocol.keyset import ROLES, KeySet, Role


class KeySetChangeError(ValueError):
    """The change asked for cannot make a valid key set; ``role`` and ``what`` say where."""

    def __init__(self, role: str, what: str, message: str, value: object = None) -> None:
        super().__init__(message)
        self.role = role
        self.what = what  # "add", "remove" or "threshold"
        self.value = value  # the threshold asked for


@dataclass(frozen=True)
class RoleChange:
    """Keys a role gains (public keys) and loses (key ids), and its threshold (None: kept)."""

    add: tuple[Ed25519PublicKey, ...] = ()
    remove: tuple[str, ...] = ()
    threshold: int | None = None


@dataclass(frozen=True)
class KeySetChange:
    """What the next version changes, role by role, and how long it is valid."""

    roles: dict[str, RoleChange] = field(default_factory=dict)
    expires_days: float = 365.0


def _changed_role(name: str, role: Role, keys: dict[str, Ed25519PublicKey], c: RoleChange) -> Role:
    ids = list(role.keyids)
    for kid in c.remove:
        if kid not in ids:
            raise KeySetChangeError(name, "remove", f"key {kid[:16]} is not in that role")
        ids.remove(kid)
    for pub in c.add:
        kid = key_id(pub)
        keys[kid] = pub
        if kid not in ids:
            ids.append(kid)
    if not ids:
        raise KeySetChangeError(name, "remove", "the role would have no key left")
    t = c.threshold if c.threshold is not None else min(role.threshold, len(ids))
    if not 1 <= t <= len(ids):
        raise KeySetChangeError(
            name, "threshold", f"must be between 1 and the role's {len(ids)} key(s)", value=t
        )
    return Role(tuple(ids), t)


def next_version(
    current: KeySet | None,
    change: KeySetChange,
    signers: list[Ed25519PublicKey],
    now: datetime,
) -> KeySet:
    """The key set one version after ``current`` (None: version 1, whose roots are
    ``signers``), with ``change`` applied. Raises KeySetChangeError naming the role."""
    if change.expires_days <= 0:
        raise KeySetChangeError("", "expires", "--expires-days must be > 0")
    unknown = set(change.roles) - set(ROLES)
    if unknown:
        raise KeySetChangeError(sorted(unknown)[0], "role", "no such role")
    roles = dict(current.roles) if current else dict.fromkeys(ROLES, Role((), 1))
    keys: dict[str, Ed25519PublicKey] = dict(current.keys) if current else {}
    if current is None:  # version 1: the signing root keys are the roots
        for k in signers:
            keys[key_id(k)] = k
        roles["root"] = Role(tuple(dict.fromkeys(key_id(k) for k in signers)), 1)
    new_roles = {
        name: _changed_role(name, roles[name], keys, change.roles.get(name, RoleChange()))
        for name in ROLES
    }
    used = {kid for r in new_roles.values() for kid in r.keyids}
    return KeySet(
        version=(current.version if current else 0) + 1,
        expires_at=now.replace(microsecond=0) + timedelta(days=change.expires_days),
        keys={k: v for k, v in keys.items() if k in used},
        roles=new_roles,
    )
