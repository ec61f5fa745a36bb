"""Operators' API tokens: create (the secret is shown once), list, revoke."""

from __future__ import annotations

from aiohttp import web

from control_plane.api.request import json_response, read_json, st
from control_plane.api.route import Route
from control_plane.security import tokens
from protocol.exceptions import InvalidMessage


async def post_token(request: web.Request) -> web.Response:
    """Create an API token."""
    state = st(request)
    body = await read_json(request)
    req = tokens.TokenRequest.parse(body)
    return json_response(await tokens.create_token(state.db, req, state.clock()), 201)


async def get_tokens(request: web.Request) -> web.Response:
    """List API tokens."""
    state = st(request)
    return json_response({"tokens": await tokens.list_tokens(state.db, state.clock())})


async def delete_token(request: web.Request) -> web.Response:
    """Revoke an API token."""
    state = st(request)
    raw = request.match_info["id"]
    if not raw.isdigit() or len(raw) > 18:
        raise InvalidMessage("token id must be a number", "id")
    return json_response(await tokens.revoke_token(state.db, int(raw), state.clock()))


ROUTES = (
    Route(
        "POST",
        "/api/v1/tokens",
        post_token,
        summary="Create an API token with scopes (the secret is shown once)",
        auth="operator",
        body="application/json",
        responses=(201, 400),
        scope="admin",
    ),
    Route(
        "GET",
        "/api/v1/tokens",
        get_tokens,
        summary="List API tokens (never their secrets)",
        auth="operator",
        scope="admin",
    ),
    Route(
        "DELETE",
        "/api/v1/tokens/{id}",
        delete_token,
        summary="Revoke an API token at once",
        auth="operator",
        responses=(200, 404),
        scope="admin",
    ),
)
