"""Content-addressed blob store on a local (or shared) directory.

Blobs live at ``<root>/sha256/<2 hex>/<64 hex>``; writes go to a temp file, fsync, rename, so a
reader never sees half a blob. The methods block: call them from a worker thread.
"""

from __future__ import annotations

from pathlib import Path

from control_plane.files import write_private
from protocol.digest import digest_hex


class BlobStore:
    """Files named by their sha256 digest."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "sha256").mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        """Where the blob with this digest lives (whether or not it exists)."""
        h = digest_hex(digest)
        return self.root / "sha256" / h[:2] / h

    def has(self, digest: str) -> bool:
        """Tell whether the blob is stored."""
        return self.path(digest).is_file()

    def put(self, digest: str, data: bytes) -> None:
        """Store ``data`` (already verified to match ``digest``) unless it is there already."""
        dest = self.path(digest)
        if not dest.is_file():
            write_private(dest, data, 0o644)
