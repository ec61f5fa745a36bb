"""The agent's local content-addressed store: blobs by digest, manifest envelopes by digest,
and each loaded version's files laid out by path in a directory of its own.

A version counts as installed once its envelope file exists, and that file is written only
after every blob it names is in place and verified. Before a version is loaded its files are
hard-linked from the blobs into ``versions/<manifest hex>/`` at their manifest paths (so ONNX
Runtime finds external data beside the model, and auxiliary files have a stable path), and
verified there, where the runtime reads them. Links cost no disk; where the file system refuses
them, files are copied, and counted. Blocking: call from a worker thread.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path

from agent.storage.statefile import write_atomic
from protocol.digest import digest_hex
from protocol.dsse import parse_envelope
from protocol.exceptions import ProtocolError
from protocol.manifest import FileEntry, parse_manifest

HASH_CHUNK = 1024 * 1024


def _digest_of(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
            n += len(chunk)
    return "sha256:" + h.hexdigest(), n


class LocalStore:
    """Blobs and manifests under the state directory."""

    def __init__(self, root: Path) -> None:
        self.blobs = root / "blobs" / "sha256"
        self.manifests = root / "manifests"
        self.partial = root / "partial"
        self.versions = root / "versions"
        for d in (self.blobs, self.manifests, self.partial, self.versions):
            d.mkdir(parents=True, exist_ok=True)

    def blob_path(self, digest: str) -> Path:
        """Where a verified blob lives."""
        return self.blobs / digest_hex(digest)

    def partial_path(self, digest: str) -> Path:
        """Where a blob being downloaded accumulates (kept across restarts, for resuming)."""
        return self.partial / digest_hex(digest)

    def has_blob(self, digest: str) -> bool:
        """Tell whether a verified blob is present."""
        return self.blob_path(digest).is_file()

    def commit_partial(self, digest: str, size: int) -> None:
        """Verify a finished partial download and move it into the store.

        Raises ValueError when its size or digest is wrong (the partial file is removed).
        """
        part = self.partial_path(digest)
        h = hashlib.sha256()
        n = 0
        with part.open("rb") as f:
            while chunk := f.read(1024 * 1024):
                h.update(chunk)
                n += len(chunk)
            os.fsync(f.fileno())
        actual = "sha256:" + h.hexdigest()
        if n != size or actual != digest:
            part.unlink(missing_ok=True)
            raise ValueError(
                f"downloaded blob is {n} bytes with digest {actual}, expected "
                f"{size} bytes with {digest}"
            )
        os.replace(part, self.blob_path(digest))

    def verify_blob(self, digest: str, size: int) -> bool:
        """Re-hash a stored blob (verify before use)."""
        path = self.blob_path(digest)
        try:
            if path.stat().st_size != size:
                return False
            h = hashlib.sha256()
            with path.open("rb") as f:
                while chunk := f.read(1024 * 1024):
                    h.update(chunk)
        except FileNotFoundError:
            return False
        return "sha256:" + h.hexdigest() == digest

    def save_manifest(self, manifest_digest: str, envelope: bytes) -> None:
        """Mark a version installed: its blobs must all be in place already."""
        write_atomic(self.manifests / f"{digest_hex(manifest_digest)}.dsse.json", envelope)

    def load_manifest(self, manifest_digest: str) -> bytes | None:
        """The stored envelope of an installed version, or None."""
        try:
            return (self.manifests / f"{digest_hex(manifest_digest)}.dsse.json").read_bytes()
        except FileNotFoundError:
            return None

    def version_dir(self, manifest_digest: str) -> Path:
        """Where a version's files are laid out by path (once :meth:`lay_out` ran)."""
        return self.versions / digest_hex(manifest_digest)

    def lay_out(self, manifest_digest: str, files: Iterable[FileEntry]) -> Path:
        """Lay ``files`` out from their blobs at their paths in a fresh version directory, each
        verified where it lies; return the directory.

        Raises ValueError naming a file that is missing or corrupt (nothing is left behind).
        """
        tmp = self.versions / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            for f in files:
                src = self.blob_path(f.digest)
                dest = tmp / f.path  # a checked relative path: no '..', no absolute
                dest.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(src, dest)
                except FileNotFoundError:
                    raise ValueError(f"stored file {f.path!r} is missing") from None
                except OSError as exc:
                    if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                        raise
                    shutil.copyfile(src, dest)
                digest, size = _digest_of(dest)
                if (digest, size) != (f.digest, f.size):
                    raise ValueError(f"stored file {f.path!r} is corrupt")
            final = self.version_dir(manifest_digest)
            old = self.versions / f".old-{uuid.uuid4().hex}"
            if final.exists():
                # A running session may still read the old directory's files: they stay
                # open (unlinked) until it lets go.
                os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
            return final
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def used_bytes(self) -> int:
        """Bytes held by blobs, partial downloads and version directories, each file counted
        once however many links it has."""
        seen: set[tuple[int, int]] = set()
        total = 0
        for d in (self.blobs, self.partial, self.versions):
            for root, _, names in os.walk(d):
                for n in names:
                    try:
                        st = os.lstat(os.path.join(root, n))
                    except FileNotFoundError:
                        continue
                    if (st.st_dev, st.st_ino) not in seen:
                        seen.add((st.st_dev, st.st_ino))
                        total += st.st_size
        return total

    def _referenced(self, manifest_digest: str) -> set[str]:
        envelope = self.load_manifest(manifest_digest)
        if envelope is None:
            return set()
        try:
            manifest = parse_manifest(parse_envelope(envelope).payload)
        except ProtocolError:
            return set()
        return {f.digest for f in manifest.files}

    def prune(self, keep: set[str]) -> int:
        """Remove installed versions not in ``keep`` and every blob no kept version names.

        Returns how many versions were removed. Manifests go first, so a crash midway leaves
        blobs without a version (removed next time), never a version without its blobs.
        """
        installed = {"sha256:" + p.name.split(".")[0] for p in self.manifests.glob("*.dsse.json")}
        drop = installed - keep
        for digest in drop:
            (self.manifests / f"{digest_hex(digest)}.dsse.json").unlink(missing_ok=True)
        kept = {digest_hex(d) for d in installed & keep}
        for vdir in self.versions.iterdir():
            if vdir.name not in kept:  # a dropped version's, or a crashed lay-out's
                shutil.rmtree(vdir, ignore_errors=True)
        wanted: set[str] = set()
        for digest in installed & keep:
            wanted |= self._referenced(digest)
        for blob in self.blobs.iterdir():
            if "sha256:" + blob.name not in wanted:
                blob.unlink(missing_ok=True)
        return len(drop)
