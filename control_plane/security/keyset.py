"""The key set on the control plane: stored versions, what they trust, how a new one gets in.

A root of trust enters only from the server's own disk (``--keyset FILE``, read at start);
after that the API accepts a version only when the root keys of the stored one signed it
(``PUT /api/v1/keyset``), so an API token alone can never make a new publisher trusted.
While no key set is installed, the publisher keys given by file are trusted, one signature
each, as before.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from control_plane.db.engine import Database
from control_plane.db.models import KeySetRow
from control_plane.errors import ConfigError, Conflict, DomainError, Invalid, Refused
from control_plane.events.outbox import emit
from protocol.dsse import key_id, parse_envelope
from protocol.exceptions import InvalidMessage, ProtocolError, ReplayError
from protocol.fields import load_json_object
from protocol.keyset import KeySet, keyset_from_json, next_keyset, open_first
from protocol.timeutil import format_time

log = logging.getLogger("modelfleet.control_plane")


@dataclass(frozen=True)
class PublisherTrust:
    """Which keys may sign a bundle, and how many of them must."""

    keys: Mapping[str, Ed25519PublicKey]
    threshold: int
    keyset_version: int | None  # None: no key set, the server's publisher key files


def _decode(envelope: bytes) -> KeySet:
    """The payload of a key set envelope, not verified (a stored one was, when stored)."""
    return keyset_from_json(load_json_object(parse_envelope(envelope).payload, "keyset"))


async def latest(db: Database) -> tuple[KeySet, str] | None:
    """The newest stored key set and its envelope, or None."""
    async with db.read() as s:
        row = await s.scalar(select(KeySetRow).order_by(KeySetRow.version.desc()).limit(1))
    return (_decode(row.envelope.encode()), row.envelope) if row else None


async def chain_after(db: Database, version: int) -> list[str]:
    """The envelopes of every version after ``version``, oldest first."""
    async with db.read() as s:
        rows = await s.scalars(
            select(KeySetRow.envelope)
            .where(KeySetRow.version > version)
            .order_by(KeySetRow.version)
        )
        return list(rows)


async def publisher_trust(db: Database, files: Mapping[str, Ed25519PublicKey]) -> PublisherTrust:
    """The publisher keys a pushed bundle is checked against (read per push: replicas may have
    installed a newer key set since)."""
    found = await latest(db)
    return trust_of(found[0] if found else None, files)


def trust_of(ks: KeySet | None, files: Mapping[str, Ed25519PublicKey]) -> PublisherTrust:
    """What ``ks`` trusts for bundles; without a key set, the publisher key files, one each."""
    if ks is None:
        return PublisherTrust(files, 1, None)
    return PublisherTrust(ks.trusted("publishers"), ks.threshold("publishers"), ks.version)


def _check_signer(ks: KeySet, signing_key: Ed25519PublicKey) -> None:
    kid = key_id(signing_key)
    if kid not in ks.roles["controlPlane"].keyids:
        raise Conflict(
            "signing_key_not_listed",
            f"this control plane signs desired states with key {kid[:16]}, which key set "
            f"version {ks.version} does not list under controlPlane: its agents would refuse "
            "every desired state. List it (beside the new key) until every replica signs "
            "with the new one.",
            "roles.controlPlane",
        )


async def install(
    db: Database, envelope: bytes, signing_key: Ed25519PublicKey, now: datetime
) -> KeySet:
    """Store the version after the newest one; raises Conflict, Invalid or Refused (nothing
    stored) when it does not follow it: not signed by the current root keys, an old version,
    a skipped one."""
    found = await latest(db)
    if found is None:
        raise Conflict(
            "no_keyset",
            "this control plane has no key set yet: the first one is installed from the "
            "server's disk (modelfleet server --keyset FILE), never over the API",
        )
    try:
        ks = next_keyset(found[0], envelope, now)
    except ReplayError as exc:
        raise Conflict("keyset_not_newer", str(exc), "version") from None
    except InvalidMessage as exc:
        kind = Conflict if exc.field == "version" else Invalid
        raise kind("invalid_keyset", str(exc), exc.field) from None
    except ProtocolError as exc:
        raise Refused("untrusted_keyset", str(exc)) from None
    _check_signer(ks, signing_key)
    await _store(db, ks, envelope, now)
    return ks


def keyset_event(ks: KeySet) -> dict[str, object]:
    """What a keyset.changed event says: the version, its expiry and the key ids per role."""
    return {
        "version": ks.version,
        "expiresAt": format_time(ks.expires_at),
        "roles": {name: list(role.keyids) for name, role in ks.roles.items()},
    }


async def _store(db: Database, ks: KeySet, envelope: bytes, now: datetime) -> None:
    try:
        async with db.write() as s:
            newest = await s.scalar(select(func.max(KeySetRow.version)))
            if (newest or 0) != ks.version - 1:
                raise Conflict(
                    "keyset_not_newer",
                    f"key set version {newest} was stored meanwhile",
                    "version",
                )
            s.add(KeySetRow(version=ks.version, envelope=envelope.decode()))
            emit(s, "keyset.changed", f"keyset/{ks.version}", keyset_event(ks), now)
    except IntegrityError:
        raise Conflict(
            "keyset_not_newer", f"key set version {ks.version} was stored meanwhile", "version"
        ) from None


async def at_start(
    db: Database, path: Path | None, signing_key: Ed25519PublicKey, now: datetime
) -> KeySet | None:
    """At start: install the key set in ``path`` (if given) when it is newer than the stored
    one, and refuse to run with a signing key the newest version does not list. Returns the
    newest version, or None. Raises ConfigError naming what is wrong.

    The file is trusted as a first key set (it came from the server's own disk); one newer
    than the stored version must follow it.
    """
    found = await latest(db)
    newest = found[0] if found else None
    if path is not None:
        newest = await _import_file(db, path, newest, signing_key, now)
    if newest is not None:
        try:
            _check_signer(newest, signing_key)
        except DomainError as exc:
            raise ConfigError(exc.message) from None
    return newest


async def _import_file(
    db: Database, path: Path, stored: KeySet | None, signing_key: Ed25519PublicKey, now: datetime
) -> KeySet | None:
    try:
        data = await asyncio.to_thread(path.read_bytes)
    except OSError as exc:
        raise ConfigError(f"key set {path}: {exc.strerror}") from None
    try:
        if stored is None:
            ks = open_first(data, now)
        else:
            if _decode(data).version <= stored.version:
                return stored  # already in (or superseded over the API)
            ks = next_keyset(stored, data, now)
    except ProtocolError as exc:
        raise ConfigError(f"key set {path}: {exc}") from None
    try:
        _check_signer(ks, signing_key)
    except DomainError as exc:
        raise ConfigError(f"key set {path}: {exc.message}") from None
    await _store(db, ks, data, now)
    log.info("installed key set version %d from %s", ks.version, path)
    return ks
