"""Configuration: the layers per model (list, change) and an agent's effective configuration."""

from __future__ import annotations

from aiohttp import web

from control_plane.api.request import json_response, read_json, st
from control_plane.api.route import Route
from control_plane.fleet import layers
from protocol.manifest import check_name


async def get_layers(request: web.Request) -> web.Response:
    """Every configuration layer (``?model=`` for one model), in precedence order."""
    model = request.query.get("model")
    found = await layers.list_layers(st(request).db, check_name(model, "model") if model else None)
    return json_response({"layers": found})


async def post_layer(request: web.Request) -> web.Response:
    """Set and unset keys of one layer; checked against every agent it reaches first."""
    state = st(request)
    change = layers.ConfigChange.parse(await read_json(request))
    layer, changed = await layers.change_layer(state.db, state.signer, change, state.clock())
    state.notifier.notify(changed)
    return json_response({"layer": layer, "agentsChanged": len(changed)})


async def get_agent_config(request: web.Request) -> web.Response:
    """An agent's configuration per model, its digest, and the digest the agent applied."""
    return json_response(await layers.agent_config(st(request).db, request.match_info["id"]))


ROUTES = (
    Route(
        "GET",
        "/api/v1/config/layers",
        get_layers,
        summary="List configuration layers",
        auth="operator",
        responses=(200, 400),
    ),
    Route(
        "POST",
        "/api/v1/config/layers",
        post_layer,
        summary="Set or unset keys of a configuration layer (fleet, selector or agent)",
        auth="operator",
        body="application/json",
        responses=(200, 400, 404),
        scope="config:write",
    ),
    Route(
        "GET",
        "/api/v1/config/agents/{id}",
        get_agent_config,
        summary="An agent's effective configuration per model",
        auth="operator",
        responses=(200, 404),
    ),
)
