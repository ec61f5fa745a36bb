"""What the control plane's parts call to trace and measure, and its "off" form.

With telemetry off (no OTLP endpoint) every part holds ``OFF``: each call does nothing and
nothing of OpenTelemetry is imported. ``control_plane/telemetry/otel.py`` is the same interface
over the SDK, built by ``control_plane.telemetry.start`` only when an endpoint is configured
(docs/adr/0023-opentelemetry.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

Attributes = Mapping[str, str | int | float | bool]


class SpanHandle:
    """A span being recorded (the off form records nothing)."""

    def set(self, key: str, value: str | int | float | bool) -> None:
        """Set one attribute."""

    def error(self, description: str) -> None:
        """Mark the span failed."""

    def traceparent(self) -> str | None:
        """This span's W3C ``traceparent`` (None when off or not recorded)."""
        return None


class _NoSpan(SpanHandle):
    def __enter__(self) -> SpanHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


NO_SPAN = _NoSpan()


class Telemetry:
    """Tracing and metrics, off: every method does nothing."""

    enabled = False

    def span(
        self,
        name: str,
        *,
        attributes: Attributes | None = None,
        parent: str | None = None,
        server: bool = False,
    ) -> Any:
        """A context manager around a span named ``name`` that yields a ``SpanHandle``:
        a child of ``parent`` (a ``traceparent``; a malformed one is ignored) when given,
        else of the current span. ``server``: an incoming request (HTTP status sets its
        outcome, an exception does not)."""
        return NO_SPAN

    def request_served(self, method: str, route: str, status: int, duration_s: float) -> None:
        """One HTTP answer, for the request duration histogram."""

    def publish(self, families: list[Any]) -> None:
        """The latest Prometheus metric families (counters and gauges), exported as OTLP
        metrics at the next interval."""

    async def aclose(self) -> None:
        """Export what is left and stop."""


OFF = Telemetry()
