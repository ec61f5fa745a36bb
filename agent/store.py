"""The agent's local content-addressed store: blobs by digest, manifest envelopes by digest.

A version counts as installed once its envelope file exists, and that file is written only
after every blob it names is in place and verified. Blocking: call from a worker thread.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from agent.statefile import write_atomic
from protocol.digest import digest_hex


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
