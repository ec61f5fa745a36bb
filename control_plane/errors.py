"""Errors of the control plane.

::

    ControlPlaneError
    ├── ApiError            an HTTP request is refused; carries status, code, message, field
    ├── DatabaseBusy        no database connection within the wait (pool exhausted, or the
    │                       server refuses more): 503 with Retry-After at the HTTP edge
    └── ConfigError         the server cannot start with the configuration it was given

Protocol errors (``protocol.exceptions.ProtocolError``) raised while parsing a request are
translated into ``ApiError`` once, in the HTTP layer.
"""

from __future__ import annotations


class ControlPlaneError(Exception):
    """Root of the control plane's own errors."""


class ApiError(ControlPlaneError):
    """A refused request, rendered as ``{"error": {"code", "message", "field"?}}``."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
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


class DatabaseBusy(ControlPlaneError):
    """No database connection could be had in time; worth retrying after ``retry_after_s``.

    Raised by ``control_plane.db.engine.Database`` for its own wait, SQLAlchemy's pool
    timeout and PostgreSQL's "too many connections", translated there once.
    """

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ConfigError(ControlPlaneError):
    """Bad configuration: a missing key file, an unreadable trust directory, and the like."""
