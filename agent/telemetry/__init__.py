"""The agent's OpenTelemetry: off unless an OTLP endpoint is configured (ADR 23)."""

from __future__ import annotations

from agent.exceptions import AgentConfigError
from agent.telemetry.base import OFF, Telemetry
from protocol.otlp import TelemetryConfig

__all__ = ["OFF", "Telemetry", "start"]


def start(config: TelemetryConfig | None) -> Telemetry:
    """The telemetry of this agent: ``OFF`` without a config, else the SDK's (imported only
    now). Raises AgentConfigError when configured but the ``otel`` extra is not installed."""
    if config is None:
        return OFF
    try:
        from agent.telemetry.otel import OtelTelemetry
    except ImportError as exc:
        raise AgentConfigError(
            f"an OTLP endpoint is configured ({config.endpoint}) but OpenTelemetry is not "
            f"installed ({exc.name or exc}): pip install 'modelfleet[otel]'"
        ) from None
    return OtelTelemetry(config)
