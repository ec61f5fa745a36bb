"""The agent's local content-addressed store: blobs by digest, manifest envelopes by digest.

A version counts as installed once its envelope file exists, and that file is written only
after every blob it names is in place and verified. Blocking: call from a worker thread.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from agent.storage.statefile import write_atomic
from protocol.digest import digest_hex
from protocol.dsse import parse_envelope
from protocol.exceptions import ProtocolError
from protocol.manifest import parse_manifest


class LocalStore:
    """Blobs and manifests under the state directory."""

    def __init__(self, root: Path) -> None:
        self.blobs = root / "blobs" / "sha256"
        self.manifests = root / "manifests"
        self.partial = root / "partial"
        for d in (self.blobs, self.manifests, self.partial):
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

    def used_bytes(self) -> int:
        """Bytes held by blobs and partial downloads."""
        return sum(p.stat().st_size for d in (self.blobs, self.partial) for p in d.iterdir())

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
        wanted: set[str] = set()
        for digest in installed & keep:
            wanted |= self._referenced(digest)
        for blob in self.blobs.iterdir():
            if "sha256:" + blob.name not in wanted:
                blob.unlink(missing_ok=True)
        return len(drop)
