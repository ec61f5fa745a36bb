"""The ``.mfb`` bundle: one uncompressed tar holding a signed manifest and the files it names.

Layout::

    manifest.json          the manifest's canonical bytes (the DSSE payload)
    manifest.dsse.json     the DSSE envelope over those bytes
    <path>                 every file the manifest lists, under its manifest path

Reading is defensive: regular files only, no links or devices, no absolute or ``..`` paths, no
member twice, every size capped before any byte is read, and nothing but what the manifest names.

Two readers: :func:`read_bundle` holds every file in memory (small bundles: the agent's offline
import, ``bundle sign``); :class:`BundleReader` streams, for bundles of any size: the manifest
and its envelope come first (the writer puts them there), so the signature can be checked before
a single file byte is read, and each file is then handed out as chunks whose digest is checked
as they pass (:func:`verified_chunks`).
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import BinaryIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from protocol.digest import sha256_digest
from protocol.dsse import MANIFEST_PAYLOAD_TYPE, Envelope, parse_envelope, verify
from protocol.exceptions import BundleError, DigestMismatch, InvalidMessage, ProtocolError
from protocol.manifest import RESERVED_PATHS, FileEntry, Manifest, check_path, parse_manifest

MEDIA_TYPE = "application/vnd.modelfleet.bundle.v1+tar"
CHUNK = 1024 * 1024


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


class _HashingReader:
    """A file object's next ``size`` bytes, hashed as tarfile copies them."""

    def __init__(self, src: BinaryIO) -> None:
        self._src = src
        self.hash = hashlib.sha256()
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        data = self._src.read(n)
        self.hash.update(data)
        self.count += len(data)
        return data


def write_bundle(out: BinaryIO, envelope: Envelope, files: Mapping[str, bytes | BinaryIO]) -> None:
    """Write a bundle tar to ``out``; the manifest bytes are the envelope's payload.

    A file given as bytes is written as it is (tests build lying bundles that way). One given
    as an open file is copied in chunks, never held whole, and must still have the size and
    digest its manifest entry gives: raises DigestMismatch when it changed since it was hashed
    (``out`` then holds a partial tar: write to a temp file).
    """
    streamed = any(not isinstance(src, bytes | bytearray) for src in files.values())
    entries = {f.path: f for f in parse_manifest(envelope.payload).files} if streamed else {}
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT, bufsize=CHUNK) as tar:

        def header(name: str, size: int) -> tarfile.TarInfo:
            info = tarfile.TarInfo(name)
            info.size = size
            info.mode = 0o644
            info.mtime = 0  # reproducible bundles: same inputs, same bytes
            return info

        def add(name: str, data: bytes) -> None:
            tar.addfile(header(name, len(data)), io.BytesIO(data))

        add("manifest.json", envelope.payload)
        add("manifest.dsse.json", envelope.to_bytes())
        for path in sorted(files):
            src = files[path]
            if isinstance(src, bytes | bytearray):
                add(path, bytes(src))
                continue
            entry = entries.get(path)
            if entry is None:
                raise BundleError(f"file {path!r} is not named in the manifest")
            reader = _HashingReader(src)
            try:
                tar.addfile(header(path, entry.size), reader)  # type: ignore[arg-type]
            except OSError:  # tarfile's "unexpected end of data": the file shrank
                raise DigestMismatch(
                    f"file {path!r} is shorter than the {entry.size} bytes hashed before"
                ) from None
            actual = "sha256:" + reader.hash.hexdigest()
            if actual != entry.digest:
                raise DigestMismatch(f"file {path!r} changed since it was hashed")


def verified_chunks(chunks: Iterable[bytes], digest: str, size: int, what: str) -> Iterator[bytes]:
    """Pass ``chunks`` through, raising DigestMismatch as soon as they run past ``size`` and, at
    the end, unless they had exactly ``size`` bytes with ``digest``. A consumer that stores
    the chunks must discard what it wrote when this raises."""
    h = hashlib.sha256()
    n = 0
    for chunk in chunks:
        n += len(chunk)
        if n > size:
            raise DigestMismatch(f"{what} is longer than the {size} bytes the manifest says")
        h.update(chunk)
        yield chunk
    if n != size:
        raise DigestMismatch(f"{what} is {n} bytes, manifest says {size}")
    actual = "sha256:" + h.hexdigest()
    if actual != digest:
        raise DigestMismatch(f"{what} has digest {actual}, manifest says {digest}")


@dataclass(frozen=True)
class BundleHead:
    """A bundle's envelope and manifest, read before any of its files."""

    envelope: Envelope
    manifest: Manifest
    manifest_bytes: bytes

    @property
    def manifest_digest(self) -> str:
        """Digest of the manifest's canonical bytes: the version's identity."""
        return sha256_digest(self.manifest_bytes)


class BundleReader:
    """A bundle read front to back in bounded memory.

    Construct it to read the head (raises BundleError or InvalidMessage), check
    ``head.envelope``'s signature, then iterate :meth:`files`: each file's entry with its
    bytes as verified chunks, to be consumed before the next is asked for. The iteration
    raises BundleError for a member the manifest does not name, one twice, one whose size
    differs from its entry's, or a named file the bundle lacks; DigestMismatch from the chunks.
    """

    def __init__(
        self, src: BinaryIO, limits: BundleLimits | None = None, *, seekable: bool = False
    ) -> None:
        self.limits = limits or BundleLimits()
        self._count = 0
        self._total = 0
        try:
            # Closed by close() / the with block: the reader outlives this method.
            mode = "r:" if seekable else "r|"
            self._tar = tarfile.open(fileobj=src, mode=mode, bufsize=CHUNK)  # noqa: SIM115
            head: dict[str, bytes] = {}
            while len(head) < len(RESERVED_PATHS):
                m = self._next()
                if m is None or m.name not in RESERVED_PATHS or m.name in head:
                    raise BundleError(
                        "a bundle must begin with manifest.json and manifest.dsse.json"
                    )
                if m.size > 1024 * 1024:
                    raise BundleError(f"bundle member {m.name!r} is over 1 MiB")
                head[m.name] = self._read_small(m)
        except tarfile.TarError as exc:
            raise BundleError(f"not a valid bundle tar: {exc}") from None
        except EOFError:
            raise BundleError("bundle tar is truncated") from None
        envelope = parse_envelope(head["manifest.dsse.json"])
        if envelope.payload != head["manifest.json"]:
            raise BundleError("manifest.json differs from the payload its envelope signs")
        self.head = BundleHead(envelope, parse_manifest(head["manifest.json"]), envelope.payload)

    def close(self) -> None:
        """Let go of the tar (the source file stays the caller's)."""
        self._tar.close()

    def __enter__(self) -> BundleReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _next(self) -> tarfile.TarInfo | None:
        m = self._tar.next()
        if m is None:
            return None
        self._count += 1
        if self._count > self.limits.max_members:
            raise BundleError(f"bundle holds more than {self.limits.max_members} members")
        if not m.isreg():
            kind = "link" if (m.issym() or m.islnk()) else "non-regular member"
            raise BundleError(f"bundle member {m.name!r} is a {kind}")
        if m.size > self.limits.max_member_bytes:
            raise BundleError(
                f"bundle member {m.name!r} declares {m.size} bytes, over the "
                f"{self.limits.max_member_bytes}-byte limit"
            )
        self._total += m.size
        if self._total > self.limits.max_total_bytes:
            raise BundleError(f"bundle is larger than {self.limits.max_total_bytes} bytes")
        return m

    def _read_small(self, m: tarfile.TarInfo) -> bytes:
        fobj = self._tar.extractfile(m)
        data = fobj.read(m.size + 1) if fobj is not None else b""
        if len(data) != m.size:
            raise BundleError(f"bundle member {m.name!r} is truncated")
        return data

    def _members(self) -> Iterator[tuple[tarfile.TarInfo, FileEntry]]:
        entries = {f.path: f for f in self.head.manifest.files}
        seen: set[str] = set()
        try:
            while (m := self._next()) is not None:
                name = m.name
                entry = entries.get(name)
                if entry is None:
                    raise BundleError(f"bundle member {name!r} is not named in the manifest")
                if name in seen:
                    raise BundleError(f"bundle member {name!r} appears twice")
                seen.add(name)
                if m.size != entry.size:
                    raise DigestMismatch(
                        f"file {name!r} is {m.size} bytes, manifest says {entry.size}"
                    )
                yield m, entry
        except tarfile.TarError as exc:
            raise BundleError(f"not a valid bundle tar: {exc}") from None
        except EOFError:
            raise BundleError("bundle tar is truncated") from None
        for f in self.head.manifest.files:
            if f.path not in seen:
                raise BundleError(f"manifest names {f.path!r}, which the bundle lacks")

    def files(self) -> Iterator[tuple[FileEntry, Iterator[bytes]]]:
        """Each file of the bundle in tar order, with its bytes as verified chunks."""
        for m, entry in self._members():
            fobj = self._tar.extractfile(m)
            if fobj is None:
                raise BundleError(f"bundle member {m.name!r} cannot be read")
            yield (
                entry,
                verified_chunks(
                    _chunks_of(fobj, m.size, m.name), entry.digest, entry.size, f"file {m.name!r}"
                ),
            )

    def check_layout(self) -> None:
        """Check every member against the manifest without reading a file's bytes (it seeks
        past them when ``seekable``): what :meth:`files` would refuse for the tar's shape, it
        refuses here first, so nothing is stored from a bundle that is refused anyway. Digests
        are not checked; raises BundleError."""
        for _ in self._members():
            pass


def _chunks_of(fobj: BinaryIO, size: int, name: str) -> Iterator[bytes]:
    left = size
    while left > 0:
        chunk = fobj.read(min(CHUNK, left))
        if not chunk:
            raise BundleError(f"bundle member {name!r} is truncated")
        left -= len(chunk)
        yield chunk


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
    "BundleHead",
    "BundleLimits",
    "BundleReader",
    "ProtocolError",
    "check_file",
    "check_files",
    "read_bundle",
    "verified_chunks",
    "verify_bundle",
    "write_bundle",
]
