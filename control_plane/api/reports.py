"""Reports for operators: compare groups of agents, metrics over time, the fleet overview."""

from __future__ import annotations

from aiohttp import web

from control_plane.api.request import json_response, st
from control_plane.api.route import Route
from control_plane.metrics import reports


async def get_compare(request: web.Request) -> web.Response:
    """Compare where a model runs best: groups by site (or a label, agent, version), with
    merged latency percentiles, throughput, error rate and cost per million inferences."""
    state = st(request)
    query = reports.parse_report_query(request.query, state.clock())
    report = await reports.compare(state.db, query, skipped=state.controller.skipped_rows)
    return json_response(report)


async def get_timeseries(request: web.Request) -> web.Response:
    """Requests, errors and p95 per group per time bucket, for charts."""
    state = st(request)
    query = reports.parse_report_query(request.query, state.clock(), series=True)
    report = await reports.timeseries(state.db, query, skipped=state.controller.skipped_rows)
    return json_response(report)


async def get_fleet(request: web.Request) -> web.Response:
    """Agents by site and state, versions deployed per model, active rollouts."""
    state = st(request)
    return json_response(await reports.fleet(state.db, state.clock(), state.config.offline_after_s))


ROUTES = (
    Route(
        "GET",
        "/api/v1/reports/compare",
        get_compare,
        summary="Compare groups of agents",
        auth="operator",
        responses=(200, 400, 404),
    ),
    Route(
        "GET",
        "/api/v1/reports/timeseries",
        get_timeseries,
        summary="Metrics per group over time",
        auth="operator",
        responses=(200, 400, 404),
    ),
    Route("GET", "/api/v1/fleet", get_fleet, summary="Fleet overview", auth="operator"),
)
