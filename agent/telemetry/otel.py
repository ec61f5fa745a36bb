"""The agent's telemetry over the OpenTelemetry SDK, exported by OTLP/HTTP.

Imported only when an OTLP endpoint is configured (``agent.telemetry.start``). The providers are
this agent's own, never the SDK's globals (a test runs agents beside a control plane in one
interpreter). Inference figures are observed from the metrics recorder's running totals at each
export (the numbers the agent's ``/metrics`` shows, under the same names), so serving a request
costs nothing more with telemetry on than off; update outcomes are counted where they happen.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Mapping
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
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from agent.report.metrics import LATENCY_BUCKETS_S
from agent.telemetry.base import Attributes, SpanHandle, Telemetry
from protocol.otlp import TelemetryConfig
from protocol.tracecontext import parse_traceparent

SCOPE = "modelfleet.agent"
EXPORT_TIMEOUT_S = 10.0


def _remote(traceparent: str) -> Context | None:
    tp = parse_traceparent(traceparent)
    if tp is None:
        return None
    span_context = SpanContext(
        int(tp.trace_id, 16),
        int(tp.span_id, 16),
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED if tp.sampled else 0),
    )
    return trace.set_span_in_context(NonRecordingSpan(span_context))


class OtelSpan(SpanHandle):
    """A recording span."""

    def __init__(self, span: trace.Span) -> None:
        self._span = span

    def set(self, key: str, value: str | int | float | bool) -> None:
        self._span.set_attribute(key, value)

    def traceparent(self) -> str | None:
        sc = self._span.get_span_context()
        if not sc.is_valid:
            return None
        return f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{int(sc.trace_flags):02x}"


class OtelTelemetry(Telemetry):
    """Spans and metrics of this agent, exported over OTLP/HTTP."""

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
        self._meter = self._meter_provider.get_meter(SCOPE)
        self._updates = self._meter.create_counter(
            "modelfleet_agent_updates",
            description="Update outcomes by model and outcome (activated, failed, refused, "
            "rolled_back)",
        )
        self.config = config

    @contextmanager
    def span(
        self,
        name: str,
        *,
        attributes: Attributes | None = None,
        parent: str | None = None,
        root: bool = False,
    ) -> Iterator[SpanHandle]:
        context = _remote(parent) if parent is not None else None
        if context is None and root:
            context = Context()  # empty: a trace of its own, whatever is current
        with self._tracer.start_as_current_span(
            name, context=context, attributes=dict(attributes or {})
        ) as span:
            yield OtelSpan(span)

    def watch_inference(self, totals: Callable[[], Mapping[tuple[str, str], Any]]) -> None:
        def rows() -> list[tuple[dict[str, str], Any]]:
            # A copy in one step: the event loop adds versions while this thread reads.
            return [({"model": m, "version": v}, t) for (m, v), t in list(totals().items())]

        def requests(options: CallbackOptions) -> Iterator[Observation]:
            for labels, t in rows():
                yield Observation(t.requests, labels)

        def errors(options: CallbackOptions) -> Iterator[Observation]:
            for labels, t in rows():
                yield Observation(t.errors, labels)

        def latency_sum(options: CallbackOptions) -> Iterator[Observation]:
            for labels, t in rows():
                yield Observation(t.latency_sum_s, labels)

        def latency_buckets(options: CallbackOptions) -> Iterator[Observation]:
            bounds = [*(repr(b) for b in LATENCY_BUCKETS_S), "+Inf"]
            for labels, t in rows():
                cumulative = 0
                for le, count in zip(bounds, list(t.buckets), strict=True):
                    cumulative += count
                    yield Observation(cumulative, {**labels, "le": le})

        m = self._meter
        m.create_observable_counter(
            "modelfleet_inference_requests",
            callbacks=[requests],
            description="Inference requests served, by model and version",
        )
        m.create_observable_counter(
            "modelfleet_inference_errors",
            callbacks=[errors],
            description="Inference requests that failed, by model and version",
        )
        m.create_observable_counter(
            "modelfleet_inference_latency_seconds_sum",
            callbacks=[latency_sum],
            unit="s",
            description="Total inference latency, by model and version",
        )
        m.create_observable_counter(
            "modelfleet_inference_latency_seconds_bucket",
            callbacks=[latency_buckets],
            description="Inference requests at or under each latency bound (le, seconds), "
            "cumulative as in Prometheus",
        )

    def update_outcome(self, model: str, version: str, outcome: str) -> None:
        self._updates.add(1, {"model": model, "version": version, "outcome": outcome})

    async def aclose(self) -> None:
        # Shutting down flushes: the last spans are sent and the metrics read once more.
        await asyncio.to_thread(self._shutdown)

    def _shutdown(self) -> None:
        self._tracer_provider.shutdown()
        self._meter_provider.shutdown()
