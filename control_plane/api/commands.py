"""Operator commands to an agent (remote diagnostics): issue, read, fetch the answer; the
agent's long-poll for its commands and its answer upload."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from control_plane.api.errors import ApiError
from control_plane.api.request import (
    actor_of,
    json_response,
    query_number,
    read_body,
    read_json,
    st,
)
from control_plane.api.route import Route
from control_plane.fleet import commands
from control_plane.security import audit
from control_plane.state import State
from protocol.fields import get_str

log = logging.getLogger("modelfleet.control_plane")
SCOPE = "agents:diagnose"
MEDIA_TYPES = {"logs": "text/plain; charset=utf-8", "diagnose": "application/gzip"}


def _limits(state: State) -> commands.Limits:
    return commands.Limits(
        retention_s=state.config.command_retention_s,
        max_pending=state.config.max_pending_commands,
    )


async def post_command(request: web.Request) -> web.Response:
    """Issue a signed command to an agent; 202 with its id, the answer comes later."""
    state = st(request)
    agent_id = request.match_info["id"]
    req = commands.CommandRequest.parse(await read_json(request))
    out = await commands.issue(
        state.db,
        state.signer.key,
        agent_id,
        req,
        now=state.clock(),
        issued_by=actor_of(request),
        limits=_limits(state),
    )
    # Wakes the agent's command long-poll (here and, through NOTIFY, on other replicas) and
    # has the MQTT bridge publish the command on the agent's topic.
    state.notifier.notify([agent_id])
    log.info("command %s (%s) issued to agent %s", out["commandId"], req.kind, agent_id)
    return json_response(out, 202)


async def get_command(request: web.Request) -> web.Response:
    """A command's state; with ``wait``, up to that many seconds until it is answered."""
    state = st(request)
    agent_id, command_id = request.match_info["id"], request.match_info["cid"]
    wait = query_number(request, "wait", 0, state.config.long_poll_max_s)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while True:
        now = state.clock()
        out = await commands.get(
            state.db, agent_id, command_id, now, state.config.command_retention_s
        )
        remaining = deadline - loop.time()
        if out["state"] not in commands.WAITING or remaining <= 0 or state.draining.is_set():
            return json_response(out)
        await state.answers.wait(command_id, min(remaining, state.config.long_poll_recheck_s))


async def get_answer(request: web.Request) -> web.Response:
    """The agent's answer: log lines (text) or a support bundle (.tar.gz). Audited."""
    state = st(request)
    agent_id, command_id = request.match_info["id"], request.match_info["cid"]
    now = state.clock()
    view, data = await commands.fetch_answer(
        state.db, agent_id, command_id, now, state.config.command_retention_s
    )
    resource = request.match_info.route.resource
    await audit.append(
        state.db,
        now,
        actor_of(request),
        f"GET {resource.canonical if resource is not None else request.path}",
        request.path,
        200,
        request.remote or "",
        {"kind": view["kind"], "bytes": len(data), "digest": view["answerDigest"]},
    )
    return web.Response(
        body=data,
        headers={
            "Content-Type": MEDIA_TYPES[view["kind"]],
            "X-Modelfleet-Digest": view["answerDigest"],
        },
    )


async def get_pending(request: web.Request) -> web.Response:
    """The agent's long-poll: its signed commands not handed over yet; 204 when none came
    within ``wait``."""
    state = st(request)
    agent_id = request.match_info["id"]
    wait = query_number(request, "wait", 0, state.config.long_poll_max_s)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while True:
        found = await commands.take_pending(state.db, [agent_id], state.clock(), "http")
        if found:
            return json_response({"commands": found[agent_id]})
        remaining = deadline - loop.time()
        if remaining <= 0 or state.draining.is_set():
            return web.Response(status=204)
        state.polling[agent_id] = state.polling.get(agent_id, 0) + 1
        try:
            await state.notifier.wait(agent_id, min(remaining, state.config.long_poll_recheck_s))
        finally:
            state.polling[agent_id] -= 1
            if not state.polling[agent_id]:
                del state.polling[agent_id]


async def post_answer(request: web.Request) -> web.Response:
    """The agent's answer to one of its commands, stored once; refused with nothing stored
    when the command is unknown, another agent's, expired, answered, or the body too large."""
    state = st(request)
    agent_id = request.match_info["id"]
    command_id = commands.check_command_id(request.match_info["cid"])
    limit = await commands.answer_limit(state.db, agent_id, command_id, state.clock())
    message = f"the answer is over the command's maxBytes ({limit})"
    data = await read_body(request, limit, ApiError(413, "answer_too_large", message, "answer"))
    out = await commands.store_answer(
        state.db, agent_id, command_id, data=data, now=state.clock(), via="http"
    )
    state.answers.wake([command_id])
    return json_response(out)


async def post_failure(request: web.Request) -> web.Response:
    """The agent's word that it could not carry a command out, and why (stored once)."""
    state = st(request)
    agent_id = request.match_info["id"]
    command_id = commands.check_command_id(request.match_info["cid"])
    body = await read_json(request)
    error = get_str(body, "error", max_len=commands.MAX_ERROR_CHARS, text=True)
    assert error is not None
    out = await commands.store_answer(
        state.db, agent_id, command_id, data=b"", now=state.clock(), via="http", error=error
    )
    state.answers.wake([command_id])
    return json_response(out)


ROUTES = (
    Route(
        "POST",
        "/api/v1/agents/{id}/commands",
        post_command,
        summary="Ask an agent for its logs or a support bundle (a signed command)",
        auth="operator",
        body="application/json",
        responses=(202, 400, 403, 404, 409),
        scope=SCOPE,
    ),
    Route(
        "GET",
        "/api/v1/agents/{id}/commands",
        get_pending,
        summary="Long-poll the agent's signed commands (its own credential only)",
        auth="agent",
        responses=(200, 204, 403),
    ),
    Route(
        "GET",
        "/api/v1/agents/{id}/commands/{cid}",
        get_command,
        summary="A command's state (wait: seconds to wait for the answer)",
        auth="operator",
        responses=(200, 403, 404),
        scope=SCOPE,
    ),
    Route(
        "GET",
        "/api/v1/agents/{id}/commands/{cid}/answer",
        get_answer,
        summary="The agent's answer: log lines or a support bundle (audited)",
        auth="operator",
        responses=(200, 403, 404, 409),
        scope=SCOPE,
    ),
    Route(
        "POST",
        "/api/v1/agents/{id}/commands/{cid}/answer",
        post_answer,
        summary="Upload the answer to a command (its own credential only; once, size-capped)",
        auth="agent",
        body="application/octet-stream",
        responses=(200, 400, 403, 404, 409, 413),
    ),
    Route(
        "POST",
        "/api/v1/agents/{id}/commands/{cid}/failure",
        post_failure,
        summary="Say why a command could not be carried out (its own credential only)",
        auth="agent",
        body="application/json",
        responses=(200, 400, 403, 404, 409),
    ),
)
