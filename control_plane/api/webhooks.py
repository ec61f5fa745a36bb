"""Webhook endpoints: create (the secret is shown once), list, delete, and each one's
delivery log. Admin only: an endpoint sends fleet events to a URL of the caller's choosing."""

from __future__ import annotations

from aiohttp import web

from control_plane.api.request import json_response, query_number, read_json, st
from control_plane.api.route import Route
from control_plane.events import endpoints
from control_plane.events.types import EVENT_TYPES
from protocol.exceptions import InvalidMessage

DELIVERY_STATES = ("pending", "delivered", "failed")


async def post_webhook(request: web.Request) -> web.Response:
    """Create a webhook endpoint."""
    state = st(request)
    req = endpoints.WebhookRequest.parse(
        await read_json(request), state.config.webhook_allow_private
    )
    created = await endpoints.create_endpoint(state.db, req, state.clock())
    return json_response(created, 201)


async def get_webhooks(request: web.Request) -> web.Response:
    """List webhook endpoints and the event types they may subscribe to."""
    found = await endpoints.list_endpoints(st(request).db)
    return json_response({"webhooks": found, "eventTypes": list(EVENT_TYPES)})


async def delete_webhook(request: web.Request) -> web.Response:
    """Delete a webhook endpoint and its delivery log."""
    return json_response(await endpoints.delete_endpoint(st(request).db, request.match_info["id"]))


async def get_deliveries(request: web.Request) -> web.Response:
    """An endpoint's delivery log, newest first."""
    limit = int(query_number(request, "limit", 50, endpoints.MAX_LIST))
    wanted = request.query.get("state")
    if wanted is not None and wanted not in DELIVERY_STATES:
        raise InvalidMessage(f"query parameter state must be one of {DELIVERY_STATES}", "state")
    found = await endpoints.list_deliveries(
        st(request).db, request.match_info["id"], max(limit, 1), wanted
    )
    return json_response({"deliveries": found})


ROUTES = (
    Route(
        "POST",
        "/api/v1/webhooks",
        post_webhook,
        summary="Create a webhook endpoint (its signing secret is shown once)",
        auth="operator",
        body="application/json",
        responses=(201, 400, 409),
        scope="admin",
    ),
    Route(
        "GET",
        "/api/v1/webhooks",
        get_webhooks,
        summary="List webhook endpoints (never their secrets) and the event types",
        auth="operator",
        scope="admin",
    ),
    Route(
        "DELETE",
        "/api/v1/webhooks/{id}",
        delete_webhook,
        summary="Delete a webhook endpoint and its delivery log",
        auth="operator",
        responses=(200, 404),
        scope="admin",
    ),
    Route(
        "GET",
        "/api/v1/webhooks/{id}/deliveries",
        get_deliveries,
        summary="A webhook endpoint's deliveries and their attempts, newest first",
        auth="operator",
        responses=(200, 400, 404),
        scope="admin",
    ),
)
