"""Errors raised by the protocol package.

Every parser here turns untrusted bytes into typed values, so every error is a kind of
``ProtocolError`` and callers at an edge catch that one root::

    ProtocolError
    ├── InvalidMessage          a document is malformed or a field is wrong (.field names it)
    ├── SignatureError          a DSSE envelope is unsigned, signed by an untrusted key, or forged
    ├── BundleError             a .mfb file is malformed
    │   └── DigestMismatch      a file's bytes do not match the digest or size its manifest gives
    └── ReplayError             a genuine signed document older than one already accepted,
                                or one that has expired
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Root of every error raised while parsing or verifying untrusted data."""


class InvalidMessage(ProtocolError):
    """A document is malformed; ``field`` names the offending field when there is one."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class SignatureError(ProtocolError):
    """A signature is missing, made by an untrusted key, or does not verify."""


class BundleError(ProtocolError):
    """A bundle file is malformed or unsafe to read."""


class DigestMismatch(BundleError):
    """Bytes whose sha256 digest or size differ from what the manifest promises."""


class ReplayError(ProtocolError):
    """A validly signed document that is older than one already accepted, or expired."""
