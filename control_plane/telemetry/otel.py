"""The control plane's telemetry over the OpenTelemetry SDK, exported by OTLP/HTTP.

Imported only when an OTLP endpoint is configured (``control_plane.telemetry.start``). The
providers are this process's own, never the SDK's globals: a test runs a control plane and
agents in one interpreter, and each keeps its own service name.

Metrics have one source of truth (ADR 23): the counters and gauges ``GET /metrics`` shows are
read from the Prometheus families the app publishes each interval (``publish``) and observed
here under the same names and labels; only the request duration, a histogram the OTLP side
cannot observe from a Prometheus one, is recorded as an OpenTelemetry histogram beside it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode
from opentelemetry.trace import TraceFlags as OtelTraceFlags

from control_plane.telemetry.base import Attributes, SpanHandle, Telemetry
from protocol.otlp import TelemetryConfig
from protocol.tracecontext import parse_traceparent

SCOPE = "modelfleet.control_plane"
EXPORT_TIMEOUT_S = 10.0


def remote_context(traceparent: str | None) -> Context | None:
    """A context whose current span is the remote ``traceparent`` (None when malformed)."""
    tp = parse_traceparent(traceparent)
    if tp is None:
        return None
    span_context = SpanContext(
        int(tp.trace_id, 16),
        int(tp.span_id, 16),
        is_remote=True,
        trace_flags=OtelTraceFlags(OtelTraceFlags.SAMPLED if tp.sampled else 0),
    )
    return trace.set_span_in_context(NonRecordingSpan(span_context))


def traceparent_of(span: trace.Span) -> str | None:
    """A span's W3C ``traceparent``."""
    sc = span.get_span_context()
    if not sc.is_valid:
        return None
    return f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{int(sc.trace_flags):02x}"


class OtelSpan(SpanHandle):
    """A recording span."""

    def __init__(self, span: trace.Span) -> None:
        self._span = span

    def set(self, key: str, value: str | int | float | bool) -> None:
        self._span.set_attribute(key, value)

    def error(self, description: str) -> None:
        self._span.set_status(Status(StatusCode.ERROR, description))

    def traceparent(self) -> str | None:
        return traceparent_of(self._span)


class PrometheusBridge:
    """Prometheus counter and gauge families observed as OTel instruments of the same names.

    ``update`` (on the event loop) swaps in the latest families; the reader's thread calls
    the instruments' callbacks, which read whatever was swapped in last.
    """

    def __init__(self, meter: Any) -> None:
        self._meter = meter
        self._latest: dict[str, list[tuple[dict[str, str], float]]] = {}
        self._made: set[str] = set()

    def update(self, families: Iterable[Any]) -> None:
        latest: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in families:
            if family.type not in ("counter", "gauge"):
                continue  # histograms are recorded where they happen (see the module)
            sample_name = family.name + ("_total" if family.type == "counter" else "")
            points = [
                (dict(s.labels), float(s.value)) for s in family.samples if s.name == sample_name
            ]
            latest[family.name] = points
            if family.name not in self._made:
                self._made.add(family.name)
                make = (
                    self._meter.create_observable_counter
                    if family.type == "counter"
                    else self._meter.create_observable_gauge
                )
                make(
                    family.name,
                    callbacks=[self._callback(family.name)],
                    description=family.documentation,
                )
        self._latest = latest

    def _callback(self, name: str) -> Any:
        def observe(options: CallbackOptions) -> Iterator[Observation]:
            for labels, value in self._latest.get(name, ()):
                yield Observation(value, labels)

        return observe


class OtelTelemetry(Telemetry):
    """Spans and metrics of this control plane process, exported over OTLP/HTTP."""

    enabled = True

    def __init__(self, config: TelemetryConfig) -> None:
        resource = Resource.create(dict(config.resource))
        interval_ms = config.export_interval_s * 1000
        self._tracer_provider = TracerProvider(resource=resource)
        self._tracer_provider.add_span_processor(
            BatchSpanProcessor(
                OTLPSpanExporter(endpoint=config.traces_url, timeout=EXPORT_TIMEOUT_S),
                schedule_delay_millis=min(interval_ms, 5000),
            )
        )
        reader = PeriodicExportingMetricReader(
            OTLPMetricExporter(endpoint=config.metrics_url, timeout=EXPORT_TIMEOUT_S),
            export_interval_millis=interval_ms,
        )
        self._meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
        self._tracer = self._tracer_provider.get_tracer(SCOPE)
        meter = self._meter_provider.get_meter(SCOPE)
        self._bridge = PrometheusBridge(meter)
        self._duration = meter.create_histogram(
            "http.server.request.duration",
            unit="s",
            description="Time to answer an HTTP request, by method, route pattern and status",
        )
        self.config = config

    @contextmanager
    def span(
        self,
        name: str,
        *,
        attributes: Attributes | None = None,
        parent: str | None = None,
        server: bool = False,
    ) -> Iterator[SpanHandle]:
        context = remote_context(parent) if parent is not None else None
        with self._tracer.start_as_current_span(
            name,
            context=context,
            kind=SpanKind.SERVER if server else SpanKind.INTERNAL,
            attributes=dict(attributes or {}),
            record_exception=not server,
            set_status_on_exception=not server,
        ) as span:
            yield OtelSpan(span)

    def request_served(self, method: str, route: str, status: int, duration_s: float) -> None:
        self._duration.record(
            duration_s,
            {
                "http.request.method": method,
                "http.route": route,
                "http.response.status_code": status,
            },
        )

    def publish(self, families: list[Any]) -> None:
        self._bridge.update(families)

    async def aclose(self) -> None:
        # Shutting down flushes: the last spans are sent and the metrics read once more.
        await asyncio.to_thread(self._shutdown)

    def _shutdown(self) -> None:
        self._tracer_provider.shutdown()
        self._meter_provider.shutdown()


__all__ = ["OtelTelemetry", "remote_context", "traceparent_of"]
