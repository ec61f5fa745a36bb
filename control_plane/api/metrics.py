"""``GET /metrics``: the control plane in Prometheus text, for the operator's own monitoring.

On the API port it is a route like the others (an operator token with ``fleet:read``); with
``--metrics-listen HOST:PORT`` it is also served there without authentication (a scrape
network apart from the API). What it holds:

- requests by method, route (the route's pattern, never the raw path: bounded labels) and
  status, and their durations (a middleware of this module counts them);
- ingest: reports and transactions written, reports queued, batch sizes and lag (the seconds
  from a report's arrival to its commit) as histograms;
- rollouts by state and rollout timeline entries by kind (read from the database at scrape
  time, so every replica reports the same fleet-wide figures), the controller's set-asides;
- agents by state (online, offline, updating, failed, stale, pending, revoked);
- the MQTT bridge's stored, malformed and redelivered messages and whether it is connected;
- database sessions in use and the pool's size;
- webhook deliveries by state, and attempts by verdict.

The fleet-wide figures cost a few grouped queries per scrape.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from control_plane.api.route import Handler, Route, guarded
from control_plane.db.models import Agent, Rollout, RolloutEvent, WebhookDelivery
from control_plane.metrics.reports import agent_state
from control_plane.rollout.machine import ACTIVE_STATES, TERMINAL_STATES
from control_plane.state import MQTT, STATE, State

NO_ROUTE = "(no route)"
# What generate_latest writes: the classic text format every Prometheus reads.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
AGENT_STATES = ("online", "offline", "updating", "failed", "stale", "pending", "revoked")
ROLLOUT_STATES = (*ACTIVE_STATES, *TERMINAL_STATES)


class RequestMetrics:
    """The counters this process keeps (requests, ingest batches), in its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "modelfleet_http_requests",
            "HTTP requests answered, by method, route pattern and status",
            ("method", "route", "status"),
            registry=self.registry,
        )
        self.duration = Histogram(
            "modelfleet_http_request_duration_seconds",
            "Time to answer an HTTP request, by method and route pattern",
            ("method", "route"),
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "modelfleet_ingest_batch_size",
            "Reports written per ingest transaction",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
            registry=self.registry,
        )
        self.lag = Histogram(
            "modelfleet_ingest_lag_seconds",
            "Seconds from a batch's oldest report's arrival to its commit",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )

    def observe_batch(self, size: int, lag_s: float) -> None:
        """The ingest writer's observer: one committed batch."""
        self.batch_size.observe(size)
        self.lag.observe(lag_s)


REQUEST_METRICS = web.AppKey("request_metrics", RequestMetrics)


def route_of(request: web.Request) -> str:
    """The pattern of the route that matched (bounded: a metric label, a span name)."""
    resource = request.match_info.route.resource
    return (resource.canonical if resource is not None else None) or NO_ROUTE


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count every answer by method, route pattern and status, and time it."""
    started = time.perf_counter()
    status = 500
    try:
        resp = await handler(request)
        status = resp.status
        return resp
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        route = route_of(request)
        m = request.app[REQUEST_METRICS]
        m.requests.labels(request.method, route, str(status)).inc()
        m.duration.labels(request.method, route).observe(time.perf_counter() - started)


class _Snapshot(Collector):
    """The process's own counters and the figures read for this one scrape."""

    def __init__(self, own: CollectorRegistry, families: list[Metric]) -> None:
        self.own = own
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.own.collect()
        yield from self.families


def _gauge(name: str, doc: str, label: str, values: dict[str, float]) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc, labels=[label])
    for key, value in sorted(values.items()):
        g.add_metric([key], value)
    return g


async def fleet_families(state: State) -> list[Metric]:
    """Fleet-wide figures from the database: agents, rollouts, timeline, webhooks."""
    now = state.clock()
    agents = dict.fromkeys(AGENT_STATES, 0.0)
    rollouts = dict.fromkeys(ROLLOUT_STATES, 0.0)
    async with state.db.read() as s:
        for a in await s.scalars(select(Agent)):
            kind = agent_state(a, now, state.config.offline_after_s)
            agents[kind] = agents.get(kind, 0.0) + 1
        for st, n in await s.execute(select(Rollout.state, func.count()).group_by(Rollout.state)):
            rollouts[st] = float(n)
        kinds = dict(
            (k, float(n))
            for k, n in await s.execute(
                select(RolloutEvent.kind, func.count()).group_by(RolloutEvent.kind)
            )
        )
        deliveries = {"pending": 0.0, "delivered": 0.0, "failed": 0.0}
        for st, n in await s.execute(
            select(WebhookDelivery.state, func.count()).group_by(WebhookDelivery.state)
        ):
            deliveries[st] = float(n)
    transitions = CounterMetricFamily(
        "modelfleet_rollout_transitions",
        "Rollout timeline entries by kind (all replicas, since the database was created)",
        labels=["kind"],
    )
    for kind, n in sorted(kinds.items()):
        transitions.add_metric([kind], n)
    return [
        _gauge("modelfleet_agents", "Agents by state", "state", agents),
        _gauge("modelfleet_rollouts", "Rollouts by state", "state", rollouts),
        transitions,
        _gauge(
            "modelfleet_webhook_deliveries",
            "Webhook deliveries in the log by state",
            "state",
            deliveries,
        ),
    ]


def process_families(app: web.Application) -> list[Metric]:
    """This process's components: ingest, controller, MQTT bridge, database pool, webhooks."""
    state = app[STATE]
    ing = state.ingest
    out: list[Metric] = [
        CounterMetricFamily(
            "modelfleet_ingest_reports", "Reports written by this process", value=ing.reports
        ),
        CounterMetricFamily(
            "modelfleet_ingest_transactions",
            "Ingest transactions committed by this process",
            value=ing.transactions,
        ),
        GaugeMetricFamily(
            "modelfleet_ingest_queued_reports", "Reports waiting for the writer", value=ing.queued
        ),
        CounterMetricFamily(
            "modelfleet_ingest_too_old",
            "Metric batches dropped as older than the dedupe horizon",
            value=ing.too_old,
        ),
        CounterMetricFamily(
            "modelfleet_rollout_set_aside",
            "Times this process set a rollout aside for a reason new to it",
            value=state.controller.set_aside,
        ),
    ]
    in_use, size = state.db.sessions_in_use()
    out.append(GaugeMetricFamily("modelfleet_db_sessions_in_use", "Open sessions", value=in_use))
    out.append(GaugeMetricFamily("modelfleet_db_sessions_max", "Sessions allowed", value=size))
    bridge: Any = app.get(MQTT)
    if bridge is not None:
        out.append(
            GaugeMetricFamily(
                "modelfleet_mqtt_connected",
                "1 when the bridge is connected to the broker",
                value=1.0 if bridge.connected.is_set() else 0.0,
            )
        )
        stored = CounterMetricFamily(
            "modelfleet_mqtt_messages",
            "Messages the MQTT bridge handled, by topic kind and outcome",
            labels=["kind", "outcome"],
        )
        for kind, n in sorted(bridge.stored.items()):
            stored.add_metric([kind, "stored"], n)
        stored.add_metric(["any", "malformed"], bridge.malformed)
        stored.add_metric(["any", "redelivery"], bridge.redelivery)
        out.append(stored)
    hooks = state.webhooks
    if hooks is not None:
        attempts = CounterMetricFamily(
            "modelfleet_webhook_attempts",
            "Webhook delivery attempts by this process, by verdict",
            labels=["verdict"],
        )
        for verdict in ("delivered", "retry", "failed"):
            attempts.add_metric([verdict], hooks.attempts[verdict])
        out.append(attempts)
    return out


async def render(app: web.Application) -> bytes:
    """The whole exposition, in Prometheus text format."""
    families = process_families(app) + await fleet_families(app[STATE])
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(app[REQUEST_METRICS].registry, families))
    return generate_latest(registry)


async def all_families(app: web.Application) -> list[Metric]:
    """Every family ``render`` writes, as values: what the OTLP export observes (ADR 23)."""
    own = list(app[REQUEST_METRICS].registry.collect())
    return own + process_families(app) + await fleet_families(app[STATE])


async def get_metrics(request: web.Request) -> web.Response:
    """The control plane's metrics in Prometheus text."""
    body = await render(request.app)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


def install(app: web.Application) -> None:
    """Serve ``GET /metrics`` on ``app``, keep its request counters, feed the ingest histograms."""
    app.router.add_route(ROUTE.method, ROUTE.path, guarded(ROUTE))
    metrics = RequestMetrics()
    app[REQUEST_METRICS] = metrics
    app[STATE].ingest.observer = metrics.observe_batch


class MetricsListener:
    """``/metrics`` on an address of its own, without authentication (``--metrics-listen``)."""

    def __init__(self, app: web.Application, host: str, port: int) -> None:
        self.main = app
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        body = await render(self.main)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def context(self, app: web.Application) -> AsyncIterator[None]:
        """For ``app.cleanup_ctx``: listen while the app runs."""
        async with self:
            yield

    async def __aenter__(self) -> MetricsListener:
        side = web.Application()
        side.router.add_get("/metrics", self._handle)
        self._runner = web.AppRunner(side, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


# Outside /api/v1 and the REST document (Prometheus' own path), behind the same access check.
ROUTE = Route(
    "GET",
    "/metrics",
    get_metrics,
    summary="The control plane's metrics in Prometheus text (requests, ingest, rollouts, "
    "agents, MQTT, database pool, webhooks)",
    auth="operator",
    scope="fleet:read",
)
