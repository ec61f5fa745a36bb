"""The HTTP edge of errors: ``ApiError`` and the one table from domain errors to statuses.

Services raise ``control_plane.errors.DomainError``s; ``to_api`` turns one into the
``ApiError`` the error middleware renders. ``ApiError`` itself is raised only in this package,
for refusals that only HTTP has: a body too large or too slow (413, 408), too many requests
(429), an unsatisfiable range (416), a missing bearer token (401), a scope the token lacks (403).
"""

from __future__ import annotations

import math

from control_plane.errors import (
    Conflict,
    DatabaseBusy,
    DomainError,
    Forbidden,
    Invalid,
    NotFound,
    Refused,
    TooLarge,
    Unauthenticated,
)
from protocol.exceptions import InvalidMessage


class ApiError(Exception):
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


# The one table: each domain error's HTTP status. Most specific class first.
STATUS_OF: tuple[tuple[type[DomainError], int], ...] = (
    (Invalid, 400),
    (Unauthenticated, 401),
    (Forbidden, 403),
    (NotFound, 404),
    (Conflict, 409),
    (TooLarge, 413),
    (Refused, 422),
)


def status_of(exc: DomainError) -> int:
    """The HTTP status of a domain error; 400 for a DomainError no row names."""
    for kind, status in STATUS_OF:
        if isinstance(exc, kind):
            return status
    return 400


def to_api(exc: DomainError | InvalidMessage | DatabaseBusy) -> ApiError:
    """The ``ApiError`` that renders ``exc``: same code, message and field.

    Besides the domain errors, the table's edge knows two more: a request the protocol's
    readers refused (``InvalidMessage``, 400 ``invalid``) and no database connection in time
    (``DatabaseBusy``, 503 with ``Retry-After``: the caller may retry).
    """
    if isinstance(exc, InvalidMessage):
        return ApiError(400, "invalid", str(exc), exc.field)
    if isinstance(exc, DatabaseBusy):
        retry = {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))}
        return ApiError(503, "database_busy", "the database is busy; retry shortly", headers=retry)
    return ApiError(status_of(exc), exc.code, exc.message, exc.field)
