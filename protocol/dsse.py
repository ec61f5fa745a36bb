"""DSSE envelopes signed with Ed25519.

The signature covers the DSSE pre-authentication encoding (PAE) of the payload type and the
payload, so a payload can never be reinterpreted as another type. A key id is the sha256 of the
raw 32-byte public key, in hex.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocol.exceptions import InvalidMessage, SignatureError

MANIFEST_PAYLOAD_TYPE = "application/vnd.modelfleet.manifest.v1+json"
DESIRED_PAYLOAD_TYPE = "application/vnd.modelfleet.desired.v1+json"

# An envelope is small; anything larger is not one of ours.
MAX_ENVELOPE_BYTES = 4 * 1024 * 1024


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding."""
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def key_id(public_key: Ed25519PublicKey) -> str:
    """Return the key id: sha256 of the raw public key, hex."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def generate_private_key() -> Ed25519PrivateKey:
    """Make a new Ed25519 signing key."""
    return Ed25519PrivateKey.generate()


def private_key_to_pem(key: Ed25519PrivateKey) -> bytes:
    """PKCS#8 PEM, unencrypted (the file mode protects it)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_key_to_pem(key: Ed25519PublicKey) -> bytes:
    """SubjectPublicKeyInfo PEM."""
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_private_key(pem: bytes) -> Ed25519PrivateKey:
    """Parse a PEM private key; raises InvalidMessage unless it is Ed25519."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise InvalidMessage(f"not a PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise InvalidMessage("private key is not Ed25519")
    return key


def load_public_key(pem: bytes) -> Ed25519PublicKey:
    """Parse a PEM public key; raises InvalidMessage unless it is Ed25519."""
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError) as exc:
        raise InvalidMessage(f"not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise InvalidMessage("public key is not Ed25519")
    return key


@dataclass(frozen=True)
class Envelope:
    """A parsed DSSE envelope; the payload is not trusted until :func:`verify` returns it."""

    payload_type: str
    payload: bytes
    signatures: tuple[tuple[str, bytes], ...]  # (keyid, signature)

    def to_json(self) -> dict[str, object]:
        """The envelope's JSON form."""
        return {
            "payloadType": self.payload_type,
            "payload": base64.b64encode(self.payload).decode(),
            "signatures": [
                {"keyid": kid, "sig": base64.b64encode(sig).decode()}
                for kid, sig in self.signatures
            ],
        }

    def to_bytes(self) -> bytes:
        """Serialized JSON, stable key order."""
        return json.dumps(self.to_json(), sort_keys=True).encode()


def sign(payload_type: str, payload: bytes, keys: Iterable[Ed25519PrivateKey]) -> Envelope:
    """Sign ``payload`` with every key given."""
    message = pae(payload_type, payload)
    sigs = tuple((key_id(k.public_key()), k.sign(message)) for k in keys)
    if not sigs:
        raise ValueError("at least one signing key is needed")
    return Envelope(payload_type, payload, sigs)


def _b64(value: object, field: str) -> bytes:
    if not isinstance(value, str):
        raise InvalidMessage(f"{field} must be a base64 string", field)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidMessage(f"{field} is not valid base64", field) from None


def parse_envelope(data: bytes) -> Envelope:
    """Parse envelope JSON bytes; raises InvalidMessage when malformed."""
    if len(data) > MAX_ENVELOPE_BYTES:
        raise InvalidMessage(f"envelope is larger than {MAX_ENVELOPE_BYTES} bytes")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidMessage(f"envelope is not JSON: {exc}") from None
    return envelope_from_json(doc)


def envelope_from_json(doc: object) -> Envelope:
    """Build an Envelope from decoded JSON; raises InvalidMessage when malformed."""
    if not isinstance(doc, dict):
        raise InvalidMessage("envelope must be a JSON object")
    payload_type = doc.get("payloadType")
    if not isinstance(payload_type, str) or not payload_type:
        raise InvalidMessage("payloadType must be a non-empty string", "payloadType")
    payload = _b64(doc.get("payload"), "payload")
    raw_sigs = doc.get("signatures")
    if not isinstance(raw_sigs, list) or not raw_sigs:
        raise InvalidMessage("signatures must be a non-empty list", "signatures")
    sigs: list[tuple[str, bytes]] = []
    for i, s in enumerate(raw_sigs):
        if not isinstance(s, dict):
            raise InvalidMessage("each signature must be an object", f"signatures[{i}]")
        kid = s.get("keyid", "")
        if not isinstance(kid, str):
            raise InvalidMessage("keyid must be a string", f"signatures[{i}].keyid")
        sigs.append((kid, _b64(s.get("sig"), f"signatures[{i}].sig")))
    return Envelope(payload_type, payload, tuple(sigs))


def verify(
    envelope: Envelope,
    trusted: Mapping[str, Ed25519PublicKey],
    payload_type: str,
    threshold: int = 1,
) -> tuple[bytes, list[str]]:
    """Return (payload, key ids that signed it) if at least ``threshold`` trusted keys signed.

    Raises SignatureError when the type is wrong or too few trusted keys signed.
    """
    if envelope.payload_type != payload_type:
        raise SignatureError(
            f"payload type is {envelope.payload_type!r}, expected {payload_type!r}"
        )
    message = pae(envelope.payload_type, envelope.payload)
    good: list[str] = []
    for kid, sig in envelope.signatures:
        key = trusted.get(kid)
        if key is None or kid in good:
            continue
        try:
            key.verify(sig, message)
        except InvalidSignature:
            continue
        good.append(kid)
    if len(good) < threshold:
        kids = ", ".join(k[:16] for k, _ in envelope.signatures) or "none"
        raise SignatureError(
            f"needs {threshold} valid signature(s) by trusted keys, has {len(good)} "
            f"(signed by key ids {kids})"
        )
    return envelope.payload, good


def keyring(keys: Iterable[Ed25519PublicKey]) -> dict[str, Ed25519PublicKey]:
    """Map key id to key."""
    return {key_id(k): k for k in keys}
