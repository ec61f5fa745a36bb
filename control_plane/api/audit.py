"""The hash-chained audit log, read by admins."""

from __future__ import annotations

from aiohttp import web

from control_plane.api.request import json_response, query_number, st
from control_plane.api.route import Route
from control_plane.security import audit


async def get_audit(request: web.Request) -> web.Response:
    """Audit events after ``after`` (an id), at most ``limit`` (1000)."""
    after = int(query_number(request, "after", 0, 2**62))
    limit = int(query_number(request, "limit", 1000, 1000)) or 1
    return json_response(await audit.list_events(st(request).db, after, limit))


ROUTES = (
    Route(
        "GET",
        "/api/v1/audit",
        get_audit,
        summary="The hash-chained audit log, oldest first",
        auth="operator",
        responses=(200, 400),
        scope="admin",
    ),
)
