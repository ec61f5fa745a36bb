"""A real OTLP/HTTP receiver on loopback: POST /v1/traces and /v1/metrics with protobuf bodies,
decoded with opentelemetry-proto's own messages, kept as plain records for the tests."""

from __future__ import annotations

import gzip
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

PROTOBUF = "application/x-protobuf"


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    return None if kind is None else getattr(v, kind)


def _attributes(kvs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in kvs if isinstance(kv, KeyValue)}


@dataclass(frozen=True)
class SpanRecord:
    """One span as received."""

    service: str
    trace_id: str
    span_id: str
    parent_id: str  # "" for a root span
    name: str
    kind: int
    attributes: dict[str, Any]
    status: int  # 0 unset, 1 ok, 2 error


@dataclass(frozen=True)
class PointRecord:
    """One metric data point as received."""

    service: str
    resource: dict[str, Any]
    metric: str
    kind: str  # sum, gauge, histogram
    attributes: dict[str, Any]
    value: float  # the sum's or gauge's value; a histogram's count


@dataclass
class OtlpReceiver:
    """Everything POSTed to it, decoded; ``url`` is the base URL to export to."""

    spans: list[SpanRecord] = field(default_factory=list)
    points: list[PointRecord] = field(default_factory=list)
    bad_requests: int = 0
    url: str = ""
    _runner: web.AppRunner | None = None

    def by_name(self, name: str, service: str | None = None) -> list[SpanRecord]:
        return [s for s in self.spans if s.name == name and service in (None, s.service)]

    def span(self, span_id: str) -> SpanRecord | None:
        return next((s for s in self.spans if s.span_id == span_id), None)

    def ancestors(self, span: SpanRecord) -> list[SpanRecord]:
        """The span's parents up to the root, as far as they arrived (nearest first)."""
        out = []
        parent = self.span(span.parent_id) if span.parent_id else None
        while parent is not None:
            out.append(parent)
            parent = self.span(parent.parent_id) if parent.parent_id else None
        return out

    def metric(self, name: str, service: str | None = None) -> list[PointRecord]:
        return [p for p in self.points if p.metric == name and service in (None, p.service)]

    async def _body(self, request: web.Request) -> bytes:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        return body

    async def _traces(self, request: web.Request) -> web.Response:
        if request.content_type != PROTOBUF:
            self.bad_requests += 1
            return web.Response(status=415)
        msg = ExportTraceServiceRequest()
        msg.ParseFromString(await self._body(request))
        for rs in msg.resource_spans:
            service = str(_attributes(rs.resource.attributes).get("service.name", ""))
            for ss in rs.scope_spans:
                for sp in ss.spans:
                    self.spans.append(
                        SpanRecord(
                            service=service,
                            trace_id=sp.trace_id.hex(),
                            span_id=sp.span_id.hex(),
                            parent_id=sp.parent_span_id.hex(),
                            name=sp.name,
                            kind=sp.kind,
                            attributes=_attributes(sp.attributes),
                            status=sp.status.code,
                        )
                    )
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(), content_type=PROTOBUF
        )

    async def _metrics(self, request: web.Request) -> web.Response:
        if request.content_type != PROTOBUF:
            self.bad_requests += 1
            return web.Response(status=415)
        msg = ExportMetricsServiceRequest()
        msg.ParseFromString(await self._body(request))
        for rm in msg.resource_metrics:
            resource = _attributes(rm.resource.attributes)
            service = str(resource.get("service.name", ""))
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    kind = m.WhichOneof("data")
                    data = getattr(m, kind)
                    for dp in data.data_points:
                        if kind == "histogram":
                            value = float(dp.count)
                        else:
                            value = dp.as_double if dp.HasField("as_double") else float(dp.as_int)
                        self.points.append(
                            PointRecord(
                                service, resource, m.name, kind, _attributes(dp.attributes), value
                            )
                        )
        return web.Response(
            body=ExportMetricsServiceResponse().SerializeToString(), content_type=PROTOBUF
        )

    async def __aenter__(self) -> OtlpReceiver:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/traces", self._traces)
        app.router.add_post("/v1/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def tree(self, trace_id: str) -> str:
        """The spans of one trace as an indented tree, for the README and failure messages."""
        mine = [s for s in self.spans if s.trace_id == trace_id]
        ids = {s.span_id for s in mine}
        lines: list[str] = []

        def walk(parent: str, depth: int) -> None:
            for s in [s for s in mine if s.parent_id == parent]:
                lines.append(f"{'  ' * depth}{s.name}  [{s.service}]")
                walk(s.span_id, depth + 1)

        for root in [s for s in mine if not s.parent_id or s.parent_id not in ids]:
            lines.append(f"{root.name}  [{root.service}]")
            walk(root.span_id, 1)
        return "\n".join(lines)
