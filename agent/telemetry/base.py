"""What the agent's parts call to trace and measure, and its "off" form.

With telemetry off (no OTLP endpoint) every part holds ``OFF``: each call does nothing, the
inference path never touches telemetry, and nothing of OpenTelemetry is imported.
``agent/telemetry/otel.py`` is the same interface over the SDK, built by
``agent.telemetry.start`` only when an endpoint is configured (docs/adr/0023-opentelemetry.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

Attributes = Mapping[str, str | int | float | bool]


class SpanHandle:
    """A span being recorded (the off form records nothing)."""

    def set(self, key: str, value: str | int | float | bool) -> None:
        """Set one attribute."""

    def traceparent(self) -> str | None:
        """This span's W3C ``traceparent`` (None when off)."""
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
        root: bool = False,
    ) -> Any:
        """A context manager around a span named ``name`` that yields a ``SpanHandle``: a
        child of ``parent`` (a ``traceparent``; a malformed one is ignored), else of the current
        span, unless ``root`` (then a trace of its own). An exception marks it failed."""
        return NO_SPAN

    def watch_inference(self, totals: Callable[[], Mapping[tuple[str, str], Any]]) -> None:
        """Observe the metrics recorder's running totals (requests, errors, latency histogram
        per model version) at each export: nothing is added to the inference path."""

    def update_outcome(self, model: str, version: str, outcome: str) -> None:
        """Count one update outcome: activated, failed, refused or rolled_back."""

    async def aclose(self) -> None:
        """Export what is left and stop."""


OFF = Telemetry()
