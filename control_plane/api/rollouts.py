"""Rollouts: create, list, read, and the pause / resume / promote / abort commands."""

from __future__ import annotations

from aiohttp import web

from control_plane.api.errors import ApiError
from control_plane.api.request import json_response, read_json, st
from control_plane.api.route import Route
from control_plane.rollout import service as rollouts
from control_plane.rollout.spec import COMMANDS, parse_command, parse_spec
from control_plane.security import keyset


async def post_rollout(request: web.Request) -> web.Response:
    """Create a rollout; the controller starts it at once."""
    state = st(request)
    spec = parse_spec(await read_json(request))
    trust = await keyset.publisher_trust(state.db, state.trusted)
    rollout_id = await rollouts.create_rollout(state.db, spec, state.clock(), trust)
    await state.controller.advance_one(rollout_id)
    return json_response(await rollouts.get_rollout(state.db, rollout_id), 201)


async def get_rollouts(request: web.Request) -> web.Response:
    """List rollouts, newest first."""
    return json_response({"rollouts": await rollouts.list_rollouts(st(request).db)})


async def get_rollout(request: web.Request) -> web.Response:
    """One rollout: stages, cohort sizes, gate results, timeline, targets."""
    return json_response(await rollouts.get_rollout(st(request).db, request.match_info["id"]))


async def post_rollout_command(request: web.Request) -> web.Response:
    """pause, resume, promote or abort (body ``{"rollback": false}`` keeps moved agents)."""
    state = st(request)
    action = request.match_info["action"]
    if action not in COMMANDS:  # a path that names no command is not found, not malformed
        raise ApiError(404, "unknown_command", f"no rollout command {action!r}", "action")
    cmd = parse_command(action, await read_json(request) if request.can_read_body else {})
    rollout_id = request.match_info["id"]
    await rollouts.run_command(
        state.db, state.signer, state.notifier, rollout_id, cmd, state.clock()
    )
    state.controller.kick()
    return json_response(await rollouts.get_rollout(state.db, rollout_id))


ROUTES = (
    Route(
        "POST",
        "/api/v1/rollouts",
        post_rollout,
        summary="Create a staged rollout",
        auth="operator",
        body="application/json",
        responses=(201, 400, 404, 409, 422),
        scope="rollouts:write",
    ),
    Route("GET", "/api/v1/rollouts", get_rollouts, summary="List rollouts", auth="operator"),
    Route(
        "GET",
        "/api/v1/rollouts/{id}",
        get_rollout,
        summary="A rollout: stages, cohorts, gate results, timeline",
        auth="operator",
        responses=(200, 404),
    ),
    Route(
        "POST",
        "/api/v1/rollouts/{id}/{action}",
        post_rollout_command,
        summary="Pause, resume, promote or abort a rollout",
        auth="operator",
        body="application/json",
        responses=(200, 400, 404, 409),
        scope="rollouts:write",
    ),
)
