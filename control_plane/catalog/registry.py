"""The model registry: accept verified bundles, list models and versions.

A version arrives either whole (``ingest_bundle``: the .mfb read front to back, its signature
checked before any file, each file streamed into the blob store while hashed) or blob by blob
as OCI registries do (``missing_blobs``, ``put_blob``, then ``register_manifest``), so a push
sends only what the store lacks and an interrupted push resumes. Blobs are content addressed
and stored only once their digest matched, so an orphan is harmless; a version's rows are
written only once every blob it names is stored.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from control_plane.catalog.blobstore import BlobNotFound, BlobStore
from control_plane.db.engine import Database
from control_plane.db.models import Blob, Model, ModelVersion
from control_plane.errors import Conflict, DomainError, Invalid, NotFound, Refused
from control_plane.fleet.config import check_schema
from control_plane.security.keyset import PublisherTrust
from protocol.bundle import BundleHead, BundleLimits, BundleReader
from protocol.digest import check_digest
from protocol.dsse import MANIFEST_PAYLOAD_TYPE, parse_envelope, verify
from protocol.exceptions import DigestMismatch, InvalidMessage, ProtocolError, SignatureError
from protocol.manifest import Manifest, parse_manifest
from protocol.timeutil import format_time

MAX_DIGESTS_ASKED = 1024


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


def _check_config_schema(m: Manifest) -> None:
    """Raise Invalid unless the manifest's configuration schema (if any) is a usable one."""
    if "configSchema" in m.extra:
        check_schema(m.extra["configSchema"], "manifest.configSchema")


def _read_head(
    path: Path, trusted: Mapping[str, Ed25519PublicKey], threshold: int, limits: BundleLimits
) -> tuple[BundleHead, list[str]]:
    """Check the bundle's shape (seeking past file bytes) and its signature. Blocking; raises
    ProtocolError or Invalid."""
    with path.open("rb") as f, BundleReader(f, limits, seekable=True) as reader:
        reader.check_layout()
        _, keyids = verify(reader.head.envelope, trusted, MANIFEST_PAYLOAD_TYPE, threshold)
        _check_config_schema(reader.head.manifest)
        return reader.head, keyids


def _store_files(path: Path, store: BlobStore, limits: BundleLimits) -> None:
    """Stream each file of a checked bundle into the store as it is hashed. Blocking; raises
    ProtocolError (a file whose digest does not match leaves nothing behind)."""
    with path.open("rb") as f, BundleReader(f, limits) as reader:
        for entry, chunks in reader.files():
            store.put_stream(entry.digest, entry.size, chunks)


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


def _same_or_conflict(existing: ModelVersion, bundle: BundleHead) -> PushResult:
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
        head, keyids = await asyncio.to_thread(
            _read_head, path, trust.keys, trust.threshold, limits
        )
        if (existing := await _existing(db, head.manifest.name, head.manifest.version)) is not None:
            return _same_or_conflict(existing, head)
        # Blobs first: each stored only once its digest matched, so an orphan left by a file
        # further on that lies, or a failed insert, is harmless and reused by the next push.
        await asyncio.to_thread(_store_files, path, store, limits)
    except ProtocolError as exc:
        raise protocol_error_to_domain(exc) from None
    return await _record(db, head, keyids)


async def _record(db: Database, head: BundleHead, keyids: list[str]) -> PushResult:
    """Write a version's rows (its blobs are stored); the same version again is a no-op."""
    m = head.manifest
    if (existing := await _existing(db, m.name, m.version)) is not None:
        return _same_or_conflict(existing, head)
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
                    await s.flush()  # a digest at two paths is one row
            s.add(
                ModelVersion(
                    model_id=model.id,
                    version=m.version,
                    manifest_digest=head.manifest_digest,
                    manifest=m.to_json(),
                    envelope=head.envelope.to_bytes().decode(),
                    runtime=m.runtime,
                    size=sum(f.size for f in m.files),
                    publisher_keyids=keyids,
                )
            )
    except IntegrityError:
        # A concurrent push of the same name and version won the race.
        if (existing := await _existing(db, m.name, m.version)) is not None:
            return _same_or_conflict(existing, head)
        raise
    return PushResult(m.name, m.version, head.manifest_digest, created=True)


def parse_digest_list(doc: object) -> list[str]:
    """The ``digests`` of a "which of these do you lack" request; raises Invalid."""
    if not isinstance(doc, dict) or not isinstance(doc.get("digests"), list):
        raise Invalid("invalid_request", 'body must be {"digests": [...]}', "digests")
    digests = doc["digests"]
    if len(digests) > MAX_DIGESTS_ASKED:
        raise Invalid("invalid_request", f"digests may list up to {MAX_DIGESTS_ASKED}", "digests")
    try:
        return [check_digest(d, f"digests[{i}]") for i, d in enumerate(digests)]
    except InvalidMessage as exc:
        raise Invalid("invalid_request", str(exc), exc.field) from None


async def missing_blobs(store: BlobStore, digests: list[str]) -> list[str]:
    """Those of ``digests`` the store lacks, in the order asked, each once."""

    def lacking() -> list[str]:
        return [d for d in dict.fromkeys(digests) if not store.has(d)]

    return await asyncio.to_thread(lacking)


async def register_manifest(
    db: Database, store: BlobStore, trust: PublisherTrust, envelope_bytes: bytes
) -> PushResult:
    """Record a version from its signed manifest envelope once every blob it names is stored
    (pushed one by one before); raises a DomainError for anything refused."""
    try:
        envelope = parse_envelope(envelope_bytes)
        _, keyids = verify(envelope, trust.keys, MANIFEST_PAYLOAD_TYPE, trust.threshold)
        manifest = parse_manifest(envelope.payload)
    except ProtocolError as exc:
        raise protocol_error_to_domain(exc) from None
    _check_config_schema(manifest)

    def check_blobs() -> None:
        for i, f in enumerate(manifest.files):
            try:
                size = store.size(f.digest)
            except BlobNotFound:
                raise Refused(
                    "blob_missing",
                    f"file {f.path!r} ({f.digest}) has not been uploaded: PUT it first",
                    f"files[{i}].digest",
                ) from None
            if size != f.size:
                raise Refused(
                    "digest_mismatch",
                    f"file {f.path!r} is {f.size} bytes in the manifest, {size} in the store",
                    f"files[{i}].size",
                )

    await asyncio.to_thread(check_blobs)
    return await _record(db, BundleHead(envelope, manifest, envelope.payload), keyids)


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
