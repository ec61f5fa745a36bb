"""Small file helpers for the control plane's own secrets and keys."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger("modelfleet.control_plane.files")


def write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` atomically (temp, fsync, rename) with ``mode`` set before any byte lands."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` 0700, or make an existing one 0700, whatever the umask (a directory
    that is not ours to change is left as it is, with a warning)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        if path.stat().st_mode & 0o777 != 0o700:
            path.chmod(0o700)
    except OSError as exc:
        log.warning("could not make %s private (0700): %s", path, exc)
