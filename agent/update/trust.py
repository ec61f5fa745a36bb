"""Checks on a version's manifest before anything of it is used. Pure."""

from __future__ import annotations

from collections.abc import Mapping

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.exceptions import UpdateError
from protocol.desired import DesiredModel
from protocol.digest import sha256_digest
from protocol.dsse import MANIFEST_PAYLOAD_TYPE, parse_envelope, verify
from protocol.exceptions import ProtocolError
from protocol.manifest import Manifest, parse_manifest


def verified_manifest(
    envelope_bytes: bytes,
    publishers: Mapping[str, Ed25519PublicKey],
    wanted: DesiredModel,
    threshold: int = 1,
) -> Manifest:
    """The manifest of ``wanted`` if ``threshold`` trusted publishers signed exactly it.

    The payload's digest must be the one the signed desired state names, and the manifest's
    name and version must match it (no mix-and-match). Raises UpdateError with the reason.
    """
    try:
        envelope = parse_envelope(envelope_bytes)
        payload, _ = verify(envelope, publishers, MANIFEST_PAYLOAD_TYPE, threshold)
        if sha256_digest(payload) != wanted.manifest_digest:
            raise UpdateError(
                f"manifest digest is {sha256_digest(payload)}, desired state names "
                f"{wanted.manifest_digest}"
            )
        manifest = parse_manifest(payload)
    except ProtocolError as exc:
        raise UpdateError(f"manifest refused: {exc}") from None
    if (manifest.name, manifest.version) != (wanted.name, wanted.version):
        raise UpdateError(
            f"manifest is {manifest.name} {manifest.version}, desired state names "
            f"{wanted.name} {wanted.version}"
        )
    return manifest
