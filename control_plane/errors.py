"""Errors of the control plane.

::

    ControlPlaneError
    ├── DomainError         a service refuses: carries code, message, field (no HTTP)
    │   ├── Invalid         the request's values are malformed or out of range
    │   ├── Unauthenticated the caller is not known (a bad enrollment token)
    │   ├── Forbidden       the caller is known, but may not do this (now)
    │   ├── NotFound        the thing named does not exist
    │   ├── Conflict        the thing exists in a state that forbids the change
    │   ├── TooLarge        what was sent is over a limit
    │   └── Refused         well-formed, but a rule says no (an untrusted signature)
    ├── BuildError          a bundle cannot be built from these files (publisher side)
    ├── DatabaseBusy        no database connection within the wait (pool exhausted, or the
    │                       server refuses more): 503 with Retry-After at the HTTP edge
    └── ConfigError         the server cannot start with the configuration it was given
        └── SettingsError   a setting (option, MODELFLEET_* variable, --config key) is bad

Services raise the domain errors; ``control_plane.api.errors`` maps each to its HTTP status
in one table, and the MQTT bridge catches them without knowing HTTP. Refusals that only HTTP
has (a body too large or too slow, 429, 416) are ``control_plane.api.errors.ApiError``.
Protocol errors (``protocol.exceptions.ProtocolError``) raised while parsing a request are
translated once, at the edge that parsed it.
"""

from __future__ import annotations


class ControlPlaneError(Exception):
    """Root of the control plane's own errors."""


class DomainError(ControlPlaneError):
    """A service's refusal: a stable ``code``, a ``message`` and the ``field`` it concerns."""

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field


class Invalid(DomainError):
    """The request's values are malformed or out of range."""


class Unauthenticated(DomainError):
    """The caller is not known."""


class Forbidden(DomainError):
    """The caller is known but may not do this, or may no longer."""


class NotFound(DomainError):
    """The thing named does not exist."""


class Conflict(DomainError):
    """The thing exists in a state that forbids the change."""


class TooLarge(DomainError):
    """What was sent is over a limit."""


class Refused(DomainError):
    """The request is well-formed, but a rule says no."""


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


class SettingsError(ConfigError):
    """A setting is malformed or out of range; the message names it and where it came from."""


class BuildError(ControlPlaneError):
    """A bundle cannot be built: a model its runtime cannot load, or variants that disagree."""
