"""The model registry: accept verified bundles, list models and versions."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from control_plane.catalog.blobstore import BlobStore
from control_plane.db.engine import Database
from control_plane.db.models import Blob, Model, ModelVersion
from control_plane.errors import Conflict, DomainError, Invalid, NotFound, Refused
from control_plane.fleet.config import check_schema
from control_plane.security.keyset import PublisherTrust
from protocol.bundle import Bundle, BundleLimits, read_bundle, verify_bundle
from protocol.exceptions import DigestMismatch, InvalidMessage, ProtocolError, SignatureError
from protocol.timeutil import format_time


@dataclass(frozen=True)
class PushResult:
    """What a push did: ``created`` is False when the identical version was already there."""

    name: str
    version: str
    manifest_digest: str
    created: bool

    def to_json(self) -> dict[str, Any]:
        """Response body."""
        return {
            "name": self.name,
            "version": self.version,
            "manifestDigest": self.manifest_digest,
            "created": self.created,
        }


def _read_verified(
    path: Path, trusted: Mapping[str, Ed25519PublicKey], threshold: int, limits: BundleLimits
) -> tuple[Bundle, list[str]]:
    with path.open("rb") as f:
        bundle = read_bundle(f, limits)
    return bundle, verify_bundle(bundle, trusted, threshold)


def protocol_error_to_domain(exc: ProtocolError) -> DomainError:
    """Translate a parse or verification failure of a bundle into a 4xx."""
    if isinstance(exc, SignatureError):
        return Refused("untrusted_signature", str(exc))
    if isinstance(exc, DigestMismatch):
        return Refused("digest_mismatch", str(exc))
    field = exc.field if isinstance(exc, InvalidMessage) else None
    return Invalid("invalid_bundle", str(exc), field)


async def _existing(db: Database, name: str, version: str) -> ModelVersion | None:
    async with db.read() as s:
        return await s.scalar(
            select(ModelVersion)
            .join(Model)
            .where(Model.name == name, ModelVersion.version == version)
        )


def _same_or_conflict(existing: ModelVersion, bundle: Bundle) -> PushResult:
    m = bundle.manifest
    if existing.manifest_digest != bundle.manifest_digest:
        raise Conflict(
            "version_exists",
            f"{m.name} {m.version} already exists with manifest {existing.manifest_digest}; "
            "publish a new version instead",
            "version",
        )
    return PushResult(m.name, m.version, existing.manifest_digest, created=False)


async def ingest_bundle(
    db: Database,
    store: BlobStore,
    trust: PublisherTrust,
    path: Path,
    limits: BundleLimits,
) -> PushResult:
    """Verify the bundle at ``path`` (``trust.threshold`` distinct publisher signatures) and
    store it; raises a DomainError for anything refused."""
    try:
        bundle, keyids = await asyncio.to_thread(
            _read_verified, path, trust.keys, trust.threshold, limits
        )
    except ProtocolError as exc:
        raise protocol_error_to_domain(exc) from None
    m = bundle.manifest
    if "configSchema" in m.extra:
        check_schema(m.extra["configSchema"], "manifest.configSchema")
    if (existing := await _existing(db, m.name, m.version)) is not None:
        return _same_or_conflict(existing, bundle)

    # Blobs first: content addressed, so an orphan left by a failed insert is harmless and is
    # simply reused by the next push of the same bytes.
    def _store_files() -> None:
        for f in m.files:
            store.put(f.digest, bundle.files[f.path])

    await asyncio.to_thread(_store_files)
    try:
        async with db.write() as s:
            model = await s.scalar(select(Model).where(Model.name == m.name))
            if model is None:
                model = Model(name=m.name)
                s.add(model)
                await s.flush()
            for f in m.files:
                if await s.get(Blob, f.digest) is None:
                    s.add(Blob(digest=f.digest, size=f.size, media_type=f.media_type))
            s.add(
                ModelVersion(
                    model_id=model.id,
                    version=m.version,
                    manifest_digest=bundle.manifest_digest,
                    manifest=m.to_json(),
                    envelope=bundle.envelope.to_bytes().decode(),
                    runtime=m.runtime,
                    size=sum(f.size for f in m.files),
                    publisher_keyids=keyids,
                )
            )
    except IntegrityError:
        # A concurrent push of the same name and version won the race.
        if (existing := await _existing(db, m.name, m.version)) is not None:
            return _same_or_conflict(existing, bundle)
        raise
    return PushResult(m.name, m.version, bundle.manifest_digest, created=True)


async def list_models(db: Database) -> list[dict[str, Any]]:
    """Every model with its version count and latest version."""
    async with db.read() as s:
        rows = (
            await s.execute(
                select(Model.name, func.count(ModelVersion.id), func.max(ModelVersion.created_at))
                .outerjoin(ModelVersion)
                .group_by(Model.id, Model.name)
                .order_by(Model.name)
            )
        ).all()
        out = []
        for name, count, _ in rows:
            latest = await s.scalar(
                select(ModelVersion.version)
                .join(Model)
                .where(Model.name == name)
                .order_by(ModelVersion.created_at.desc(), ModelVersion.id.desc())
                .limit(1)
            )
            out.append({"name": name, "versions": count, "latest": latest})
        return out


def version_json(v: ModelVersion) -> dict[str, Any]:
    """Public view of a model version."""
    sig = v.manifest.get("signature", {})
    return {
        "version": v.version,
        "manifestDigest": v.manifest_digest,
        "runtime": v.runtime,
        "size": v.size,
        "publisherKeyIds": v.publisher_keyids,
        "created": format_time(v.created_at),
        "inputs": sig.get("inputs", []),
        "outputs": sig.get("outputs", []),
        "smokeTest": "smokeTest" in v.manifest,
    }


async def list_versions(db: Database, name: str) -> list[dict[str, Any]]:
    """Versions of one model, oldest first; raises NotFound for an unknown model."""
    async with db.read() as s:
        model = await s.scalar(select(Model).where(Model.name == name))
        if model is None:
            raise NotFound("model_not_found", f"no model named {name!r}", "name")
        rows = await s.scalars(
            select(ModelVersion)
            .where(ModelVersion.model_id == model.id)
            .order_by(ModelVersion.created_at, ModelVersion.id)
        )
        return [version_json(v) for v in rows]


async def get_envelope(db: Database, manifest_digest: str) -> str:
    """The signed manifest envelope of a version; raises NotFound when unknown."""
    async with db.read() as s:
        env = await s.scalar(
            select(ModelVersion.envelope).where(ModelVersion.manifest_digest == manifest_digest)
        )
    if env is None:
        raise NotFound("manifest_not_found", f"no manifest {manifest_digest}", "digest")
    return env
