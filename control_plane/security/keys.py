"""Key material of the control plane: its own signing key and the publishers it trusts."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from control_plane.errors import ConfigError
from control_plane.security.files import write_private
from protocol.dsse import (
    generate_private_key,
    keyring,
    load_private_key,
    load_public_key,
    private_key_to_pem,
)
from protocol.exceptions import InvalidMessage


def load_or_create_signing_key(path: Path) -> Ed25519PrivateKey:
    """Load the control plane's key, creating it (0600) on first start.

    Raises ConfigError when the file exists but is not an Ed25519 private key.
    """
    if path.exists():
        try:
            return load_private_key(path.read_bytes())
        except InvalidMessage as exc:
            raise ConfigError(f"{path}: {exc}") from None
    key = generate_private_key()
    write_private(path, private_key_to_pem(key))
    return key


def load_trusted_publishers(
    files: tuple[Path, ...], directory: Path
) -> dict[str, Ed25519PublicKey]:
    """Publisher keys from explicit files plus ``directory/*.pub``.

    Raises ConfigError naming a file that is missing or not an Ed25519 public key.
    """
    paths = list(files)
    if directory.is_dir():
        paths += sorted(directory.glob("*.pub"))
    keys = []
    for p in paths:
        try:
            keys.append(load_public_key(p.read_bytes()))
        except OSError as exc:
            raise ConfigError(f"trusted publisher key {p}: {exc.strerror}") from None
        except InvalidMessage as exc:
            raise ConfigError(f"trusted publisher key {p}: {exc}") from None
    return keyring(keys)
