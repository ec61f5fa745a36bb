"""OpenTelemetry at the HTTP edge: a server span per request, named by the route's pattern
(``GET /api/v1/agents/{id}``, never the raw path), a child of the caller's ``traceparent``
header when it sends a well-formed one to an operator's route; and the export of
``GET /metrics``' figures over OTLP each interval (docs/adr/0023-opentelemetry.md). Installed
only when telemetry is on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from aiohttp import web

from control_plane.api.metrics import all_families, route_of
from control_plane.api.route import Handler
from control_plane.api.routes import ROUTES
from control_plane.state import STATE
from protocol.tracecontext import checked_traceparent

log = logging.getLogger("modelfleet.telemetry")
# The routes whose caller may choose the trace a request joins: an operator's tooling. Agents
# and anonymous callers (enrollment, health) are hostile input: a parent of theirs would graft
# the control plane's spans, and the desired state it signs, into a trace they chose, and an
# unsampled flag would switch the recording of their requests off. Their traceparent is kept
# as an attribute instead (ADR 23).
TRUSTED_PARENT = frozenset((r.method, r.path) for r in ROUTES if r.auth == "operator")


@web.middleware
async def tracing_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer inside a server span; its status is the answer's (5xx marks it failed)."""
    telemetry = request.app[STATE].telemetry
    route = route_of(request)
    started = time.perf_counter()
    status = 500
    attributes = {"http.request.method": request.method, "http.route": route}
    caller = request.headers.get("traceparent")
    if (request.method, route) not in TRUSTED_PARENT:
        if (checked := checked_traceparent(caller)) is not None:
            attributes["modelfleet.caller.traceparent"] = checked
        caller = None
    with telemetry.span(
        f"{request.method} {route}", server=True, parent=caller, attributes=attributes
    ) as span:
        try:
            resp = await handler(request)
            status = resp.status
            return resp
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            span.set("http.response.status_code", status)
            if status >= 500:
                span.error(f"HTTP {status}")
            telemetry.request_served(request.method, route, status, time.perf_counter() - started)


async def _publish_loop(app: web.Application) -> None:
    """Hand the latest figures to the OTLP export, once per export interval."""
    state = app[STATE]
    assert state.config.telemetry is not None
    while True:
        try:
            state.telemetry.publish(await all_families(app))
        except asyncio.CancelledError:
            raise
        except Exception:
            # The loop's boundary: a failed read (the database went away) is retried next time;
            # the export goes on with the figures it had.
            log.exception("could not read the figures to export")
        await asyncio.sleep(state.config.telemetry.export_interval_s)


async def telemetry_context(app: web.Application) -> AsyncIterator[None]:
    """For ``app.cleanup_ctx`` (after the database is up): export while the app runs; on exit
    publish the figures once more, then send every span and metric left."""
    state = app[STATE]
    task = asyncio.create_task(_publish_loop(app), name="otlp-metrics")
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        try:
            state.telemetry.publish(await all_families(app))
        except Exception:
            # Shutdown's boundary: the last figures are lost, the spans still go out.
            log.exception("could not read the last figures to export")
        await state.telemetry.aclose()
