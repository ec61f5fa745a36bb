"""GET /api/v1/health: liveness, a database round trip, and what the loops set aside."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from sqlalchemy import select

from control_plane.api.request import json_response, st
from control_plane.api.route import Route
from control_plane.metrics.rollup import set_aside_count
from control_plane.state import MQTT


async def health(request: web.Request) -> web.Response:
    """Liveness plus a database round trip, the MQTT bridge's counters when there is one, and
    what the loops set aside to go on (control_plane/setaside.py)."""
    state = st(request)
    async with state.db.read() as s:
        await s.execute(select(1))
        held = await set_aside_count(s)
    ingest = state.ingest
    out: dict[str, Any] = {
        "status": "ok",
        "ingest": {
            "reports": ingest.reports,
            "transactions": ingest.transactions,
            "largestBatch": ingest.largest_batch,
        },
    }
    bridge = request.app.get(MQTT)
    if bridge is not None:
        out["mqtt"] = {
            "connected": bridge.connected.is_set(),  # type: ignore[attr-defined]
            "stored": bridge.stored,  # type: ignore[attr-defined]
            "malformed": bridge.malformed,  # type: ignore[attr-defined]
            "leftForRedelivery": bridge.redelivery,  # type: ignore[attr-defined]
        }
    controller = state.controller
    out["setAside"] = {
        "rollouts": controller.set_aside,  # a rollout set aside, once per distinct reason
        "rolloutsFailing": len(controller.failing),  # rollouts whose last advance failed
        "metricRows": controller.skipped_rows.count,  # rows gates and reports left out
        "rollupRows": held,  # rows held in metric_set_aside
        "mqttMalformed": bridge.malformed if bridge is not None else 0,  # type: ignore[attr-defined]
        "notify": state.notifier.set_aside,  # failed listeners and garbage notifications
    }
    return json_response(out)


ROUTES = (
    Route("GET", "/api/v1/health", health, summary="Liveness and database check", auth="none"),
)
