"""A second (or replacement) signature on a bundle that is already built: threshold signing,
where each release manager signs with their own key on their own machine.

The manifest is not changed, so the version's identity (the manifest digest) stays the same;
the envelope gains the signature and keeps everyone else's (a key that signed before is
replaced by its new signature, never counted twice). Streamed like the build: the bundle's
layout is checked without reading a file's bytes, then every file is copied to a temp file
beside the output with its digest checked as it passes, and the temp file replaces the output
only when all of it was right. Memory stays bounded whatever the bundle's size.
"""

from __future__ import annotations

import contextlib
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from control_plane.security.files import atomic_writer
from protocol.bundle import BundleReader, write_bundle
from protocol.dsse import Envelope, key_id, sign
from protocol.exceptions import BundleError


@dataclass(frozen=True, kw_only=True)
class Cosigned:
    """What signing wrote: where, how many signatures the envelope now holds, whose was added."""

    out: Path
    signatures: int
    key_id: str


def add_signature(src: Path, key: Ed25519PrivateKey, out: Path) -> Cosigned:
    """Write ``src`` to ``out`` (which may be ``src``) with ``key``'s signature added.

    Raises OSError when a file cannot be read or written, BundleError / InvalidMessage when
    ``src`` is not a well-formed bundle, DigestMismatch when a file is not what the manifest
    says (``out`` is then left as it was).
    """
    with src.open("rb") as f, BundleReader(f, seekable=True) as reader:
        env = reader.head.envelope
        entries = reader.head.manifest.files
        reader.check_layout()
    kid = key_id(key.public_key())
    mine = sign(env.payload_type, env.payload, [key]).signatures
    others = tuple(s for s in env.signatures if s[0] != kid)
    envelope = Envelope(env.payload_type, env.payload, others + mine)
    with (
        atomic_writer(out, 0o644) as dst,
        tarfile.open(src, mode="r:") as tar,
        contextlib.ExitStack() as stack,
    ):
        files: dict[str, bytes | BinaryIO] = {
            e.path: stack.enter_context(_member(tar, e.path)) for e in entries
        }
        write_bundle(dst, envelope, files)  # checks each file's size and digest
    return Cosigned(out=out, signatures=len(envelope.signatures), key_id=kid)


@contextlib.contextmanager
def _member(tar: tarfile.TarFile, path: str) -> Iterator[BinaryIO]:
    try:
        fobj = tar.extractfile(path)
    except KeyError:
        fobj = None
    if fobj is None:  # check_layout saw it: the file changed since
        raise BundleError(f"bundle member {path!r} cannot be read")
    with fobj:
        yield cast(BinaryIO, fobj)
