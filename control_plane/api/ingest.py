"""What agents report over HTTP: status and metrics batches, into the shared Ingestor."""

from __future__ import annotations

from aiohttp import web

from control_plane.api.request import json_response, read_json, st
from control_plane.api.route import Route
from control_plane.fleet import reports
from protocol.reports import metrics_from_json, status_from_json


async def post_status(request: web.Request) -> web.Response:
    """An agent's status report."""
    agent_id = request.match_info["id"]
    state = st(request)
    body = reports.parse_report_body(await read_json(request), agent_id)
    # Stale (older than the stored status, control_plane/fleet/status_order.py): a 200 all the
    # same, so the agent does not send it again; its next report is newer.
    stored = await state.ingest.status(status_from_json(body))
    return json_response({"stored": stored, "stale": not stored})


async def post_metrics(request: web.Request) -> web.Response:
    """A metrics batch; stored once per (agent, seq), so retries are safe."""
    agent_id = request.match_info["id"]
    state = st(request)
    batch = metrics_from_json(reports.parse_report_body(await read_json(request), agent_id))
    stored = await state.ingest.metrics(batch)
    return json_response({"stored": stored, "duplicate": not stored, "seq": batch.seq})


ROUTES = (
    Route(
        "POST",
        "/api/v1/agents/{id}/status",
        post_status,
        summary="Report the agent's status",
        auth="agent",
        body="application/json",
        responses=(200, 400, 403),
    ),
    Route(
        "POST",
        "/api/v1/agents/{id}/metrics",
        post_metrics,
        summary="Report a metrics batch",
        auth="agent",
        body="application/json",
        responses=(200, 400, 403),
    ),
)
