"""OTLP export settings both the agent and the control plane take (pure).

Telemetry is on when an endpoint is given: the ``--otlp-endpoint`` option (or its setting) or
the standard ``OTEL_EXPORTER_OTLP_ENDPOINT`` variable, a base URL to which ``/v1/traces`` and
``/v1/metrics`` are appended (OTLP over HTTP with protobuf bodies). ``OTEL_SERVICE_NAME``
and ``OTEL_RESOURCE_ATTRIBUTES`` name the process as the OpenTelemetry specification says
(``OTEL_SERVICE_NAME`` wins over a ``service.name`` among the attributes);
``OTEL_SDK_DISABLED=true`` turns it off whatever else is set. See docs/adr/0023-opentelemetry.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

ENDPOINT_VAR = "OTEL_EXPORTER_OTLP_ENDPOINT"
SERVICE_VAR = "OTEL_SERVICE_NAME"
RESOURCE_VAR = "OTEL_RESOURCE_ATTRIBUTES"
DISABLED_VAR = "OTEL_SDK_DISABLED"
MAX_RESOURCE_ATTRIBUTES = 64
MAX_ATTRIBUTE_LEN = 1024


@dataclass(frozen=True)
class TelemetryConfig:
    """Where and how often a process exports its traces and metrics over OTLP/HTTP."""

    endpoint: str  # base URL: http(s)://host:port[/path]
    service_name: str
    resource: Mapping[str, str] = field(default_factory=dict)
    # Metrics are exported, and finished spans sent, at least this often.
    export_interval_s: float = 10.0
    # The agent only: the fraction of inference requests traced (0: none, the hot path skips
    # telemetry entirely).
    inference_sample: float = 0.0

    @property
    def traces_url(self) -> str:
        """Where spans are POSTed."""
        return self.endpoint.rstrip("/") + "/v1/traces"

    @property
    def metrics_url(self) -> str:
        """Where metrics are POSTed."""
        return self.endpoint.rstrip("/") + "/v1/metrics"


def check_endpoint(value: str) -> str:
    """An OTLP/HTTP base URL; raises ValueError saying what is wrong."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be an http:// or https:// URL with a host, got {value!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"must be a base URL without query or fragment, got {value!r}")
    return value


def parse_resource_attributes(text: str) -> dict[str, str]:
    """``key1=value1,key2=value2`` (values percent-encoded) as a dict; raises ValueError."""
    out: dict[str, str] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key, value = key.strip(), unquote(value.strip())
        if not sep or not key:
            raise ValueError(f"{item.strip()!r} is not key=value")
        if len(key) > MAX_ATTRIBUTE_LEN or len(value) > MAX_ATTRIBUTE_LEN:
            raise ValueError(f"{key[:40]!r}: longer than {MAX_ATTRIBUTE_LEN} characters")
        out[key] = value
    if len(out) > MAX_RESOURCE_ATTRIBUTES:
        raise ValueError(f"more than {MAX_RESOURCE_ATTRIBUTES} attributes")
    return out


def telemetry_config(
    *,
    endpoint: str | None,
    env: Mapping[str, str],
    default_service: str,
    export_interval_s: float = 10.0,
    inference_sample: float = 0.0,
) -> TelemetryConfig | None:
    """The process's telemetry settings, None when off; raises ValueError naming the setting
    or variable that is wrong."""
    if env.get(DISABLED_VAR, "").strip().lower() == "true":
        return None
    endpoint = endpoint or env.get(ENDPOINT_VAR) or None
    if endpoint is None:
        return None
    try:
        check_endpoint(endpoint)
    except ValueError as exc:
        raise ValueError(f"otlp endpoint {exc}") from None
    try:
        resource = parse_resource_attributes(env.get(RESOURCE_VAR, ""))
    except ValueError as exc:
        raise ValueError(f"{RESOURCE_VAR}: {exc}") from None
    if not 0 < export_interval_s <= 3600:
        raise ValueError("otlp interval must be between 0 and 3600 seconds")
    if not 0 <= inference_sample <= 1:
        raise ValueError("otlp inference sample must be between 0 and 1")
    service = env.get(SERVICE_VAR) or resource.get("service.name") or default_service
    return TelemetryConfig(
        endpoint=endpoint,
        service_name=service,
        resource={**resource, "service.name": service},
        export_interval_s=export_interval_s,
        inference_sample=inference_sample,
    )
