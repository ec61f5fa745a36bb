"""Small file helpers: files written whole or not at all (the control plane's secrets and
keys, bundles, blobs), private directories."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger("modelfleet.control_plane.files")


@contextlib.contextmanager
def atomic_writer(
    path: Path, mode: int = 0o600, *, prefix: str | None = None
) -> Iterator[BinaryIO]:
    """A file whose bytes replace ``path`` whole when the block ends without an error: a temp
    file beside it (named ``prefix``…, default ``.<name>.``…), ``mode`` set before any byte
    lands, fsync, rename. On an error ``path`` stays as it was and the temp file goes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix or f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` atomically (temp, fsync, rename) with ``mode`` set before any byte lands."""
    with atomic_writer(path, mode) as f:
        f.write(data)


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` 0700, or make an existing one 0700, whatever the umask (a directory
    that is not ours to change is left as it is, with a warning)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        if path.stat().st_mode & 0o777 != 0o700:
            path.chmod(0o700)
    except OSError as exc:
        log.warning("could not make %s private (0700): %s", path, exc)
