"""The ``.mfb`` bundle: one uncompressed tar holding a signed manifest and the files it names.

Layout::

    manifest.json          the manifest's canonical bytes (the DSSE payload)
    manifest.dsse.json     the DSSE envelope over those bytes
    <path>                 every file the manifest lists, under its manifest path

Reading is defensive: regular files only, no links or devices, no absolute or ``..`` paths, no
member twice, every size capped before any byte is read, and nothing but what the manifest names.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import BinaryIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from protocol.digest import sha256_digest
from protocol.dsse import MANIFEST_PAYLOAD_TYPE, Envelope, parse_envelope, verify
from protocol.exceptions import BundleError, DigestMismatch, InvalidMessage, ProtocolError
from protocol.manifest import RESERVED_PATHS, Manifest, check_path, parse_manifest

MEDIA_TYPE = "application/vnd.modelfleet.bundle.v1+tar"


@dataclass(frozen=True)
class BundleLimits:
    """Caps applied while reading a bundle."""

    max_total_bytes: int = 2 * 1024**3
    max_member_bytes: int = 2 * 1024**3
    max_members: int = 66


@dataclass(frozen=True)
class Bundle:
    """A bundle read from a tar; ``verified`` only after :func:`verify_bundle`."""

    envelope: Envelope
    manifest: Manifest
    manifest_bytes: bytes
    files: dict[str, bytes]

    @property
    def manifest_digest(self) -> str:
        """Digest of the manifest's canonical bytes: the version's identity."""
        return sha256_digest(self.manifest_bytes)


def write_bundle(out: BinaryIO, envelope: Envelope, files: Mapping[str, bytes]) -> None:
    """Write a bundle tar to ``out``; the manifest bytes are the envelope's payload."""
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 0  # reproducible bundles: same inputs, same bytes
            tar.addfile(info, io.BytesIO(data))

        add("manifest.json", envelope.payload)
        add("manifest.dsse.json", envelope.to_bytes())
        for path in sorted(files):
            add(path, files[path])


def read_bundle(src: BinaryIO, limits: BundleLimits | None = None) -> Bundle:
    """Read and structurally check a bundle; raises BundleError or InvalidMessage.

    Signature and digests are not checked here: call :func:`verify_bundle`.
    """
    limits = limits or BundleLimits()
    members: dict[str, bytes] = {}
    total = 0
    try:
        with tarfile.open(fileobj=src, mode="r:") as tar:
            while (m := tar.next()) is not None:
                if len(members) >= limits.max_members:
                    raise BundleError(f"bundle holds more than {limits.max_members} members")
                if not m.isreg():
                    kind = "link" if (m.issym() or m.islnk()) else "non-regular member"
                    raise BundleError(f"bundle member {m.name!r} is a {kind}")
                name = m.name
                if name not in RESERVED_PATHS:
                    try:
                        check_path(name, "member")
                    except InvalidMessage:
                        raise BundleError(f"bundle member {name!r} has an unsafe path") from None
                if name in members:
                    raise BundleError(f"bundle member {name!r} appears twice")
                if m.size > limits.max_member_bytes:
                    raise BundleError(
                        f"bundle member {name!r} declares {m.size} bytes, over the "
                        f"{limits.max_member_bytes}-byte limit"
                    )
                total += m.size
                if total > limits.max_total_bytes:
                    raise BundleError(f"bundle is larger than {limits.max_total_bytes} bytes")
                fobj = tar.extractfile(m)
                if fobj is None:
                    raise BundleError(f"bundle member {name!r} cannot be read")
                data = fobj.read(m.size + 1)
                if len(data) != m.size:
                    raise BundleError(f"bundle member {name!r} is truncated")
                members[name] = data
    except tarfile.TarError as exc:
        raise BundleError(f"not a valid bundle tar: {exc}") from None
    except EOFError:
        raise BundleError("bundle tar is truncated") from None

    for required in RESERVED_PATHS:
        if required not in members:
            raise BundleError(f"bundle lacks {required}")
    envelope = parse_envelope(members.pop("manifest.dsse.json"))
    manifest_bytes = members.pop("manifest.json")
    if envelope.payload != manifest_bytes:
        raise BundleError("manifest.json differs from the payload its envelope signs")
    manifest = parse_manifest(manifest_bytes)
    named = {f.path for f in manifest.files}
    for path in members:
        if path not in named:
            raise BundleError(f"bundle member {path!r} is not named in the manifest")
    for f in manifest.files:
        if f.path not in members:
            raise BundleError(f"manifest names {f.path!r}, which the bundle lacks")
    return Bundle(envelope, manifest, manifest_bytes, members)


def check_file(data: bytes, digest: str, size: int, what: str) -> None:
    """Raise DigestMismatch unless ``data`` has exactly this size and digest."""
    if len(data) != size:
        raise DigestMismatch(f"{what} is {len(data)} bytes, manifest says {size}")
    actual = "sha256:" + hashlib.sha256(data).hexdigest()
    if actual != digest:
        raise DigestMismatch(f"{what} has digest {actual}, manifest says {digest}")


def verify_bundle(
    bundle: Bundle, trusted: Mapping[str, Ed25519PublicKey], threshold: int = 1
) -> list[str]:
    """Check the publisher signature and every file digest; return the signing key ids.

    Raises SignatureError or DigestMismatch.
    """
    _, keyids = verify(bundle.envelope, trusted, MANIFEST_PAYLOAD_TYPE, threshold)
    check_files(bundle)
    return keyids


def check_files(bundle: Bundle) -> None:
    """Raise DigestMismatch unless every file has the size and digest its manifest gives."""
    for f in bundle.manifest.files:
        check_file(bundle.files[f.path], f.digest, f.size, f"file {f.path!r}")


__all__ = [
    "MEDIA_TYPE",
    "Bundle",
    "BundleLimits",
    "ProtocolError",
    "check_file",
    "check_files",
    "read_bundle",
    "verify_bundle",
    "write_bundle",
]
