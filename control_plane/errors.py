"""Errors of the control plane.

::

    ControlPlaneError
    ├── ApiError            an HTTP request is refused; carries status, code, message, field
    └── ConfigError         the server cannot start with the configuration it was given

Protocol errors (``protocol.exceptions.ProtocolError``) raised while parsing a request are
translated into ``ApiError`` once, in the HTTP layer.
"""

from __future__ import annotations


class ControlPlaneError(Exception):
    """Root of the control plane's own errors."""


class ApiError(ControlPlaneError):
    """A refused request, rendered as ``{"error": {"code", "message", "field"?}}``."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers or {}

    def to_json(self) -> dict[str, object]:
        """The error body."""
        err: dict[str, object] = {"code": self.code, "message": self.message}
        if self.field:
            err["field"] = self.field
        return {"error": err}


class ConfigError(ControlPlaneError):
    """Bad configuration: a missing key file, an unreadable trust directory, and the like."""
