"""The route table: every resource module's routes, in the order the OpenAPI document lists
them, and GET /api/v1/openapi.json, the document of this table."""

from __future__ import annotations

from aiohttp import web

from control_plane.api import (
    agents,
    audit,
    blobs,
    commands,
    config,
    health,
    ingest,
    keyset,
    models,
    reports,
    rollouts,
    tokens,
    webhooks,
)
from control_plane.api.openapi import build_openapi
from control_plane.api.request import json_response
from control_plane.api.route import Route, guarded


async def openapi_json(request: web.Request) -> web.Response:
    """The OpenAPI document."""
    return json_response(build_openapi(ROUTES))


ROUTES: tuple[Route, ...] = (
    *health.ROUTES,
    Route(
        "GET", "/api/v1/openapi.json", openapi_json, summary="This OpenAPI document", auth="none"
    ),
    *models.ROUTES,
    *keyset.ROUTES,
    *blobs.ROUTES,
    *agents.ROUTES,
    *commands.ROUTES,
    *ingest.ROUTES,
    *rollouts.ROUTES,
    *config.ROUTES,
    *reports.ROUTES,
    *tokens.ROUTES,
    *audit.ROUTES,
    *webhooks.ROUTES,
)

# The routes that answer without a bearer token (auth="none"), for the middlewares that skip
# authentication and count refusals there: read from the table, never listed twice.
PUBLIC_PATHS = frozenset(r.path for r in ROUTES if r.auth == "none")


def add_api_routes(app: web.Application) -> None:
    """Register every route, each behind its access check (route.guarded)."""
    for r in ROUTES:
        app.router.add_route(r.method, r.path, guarded(r))
