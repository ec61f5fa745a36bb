"""Content digests in the OCI form ``sha256:<64 hex>``."""

from __future__ import annotations

import hashlib
import re

from protocol.exceptions import InvalidMessage

_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


def sha256_digest(data: bytes) -> str:
    """Return the ``sha256:<hex>`` digest of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def is_digest(value: object) -> bool:
    """Tell whether ``value`` is a well-formed sha256 digest string."""
    return isinstance(value, str) and bool(_DIGEST_RE.fullmatch(value))


def check_digest(value: object, field: str = "digest") -> str:
    """Return ``value`` if it is a well-formed digest; raises InvalidMessage otherwise."""
    if not is_digest(value):
        raise InvalidMessage(f"{field} must look like 'sha256:<64 lowercase hex>'", field)
    assert isinstance(value, str)
    return value


def digest_hex(digest: str) -> str:
    """Return the hex part of a checked digest (raises InvalidMessage when malformed)."""
    return check_digest(digest)[len("sha256:") :]
