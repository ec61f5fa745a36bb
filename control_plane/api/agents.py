"""Agents: enrollment tokens, enroll, list and read, the desired-state long-poll, credential
rotation, approval, relabel and revocation."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from control_plane.api.request import json_response, query_number, read_json, st
from control_plane.api.route import Route
from control_plane.fleet import agents as fleet
from control_plane.fleet import desired
from control_plane.security import credentials, keyset
from protocol.dsse import public_key_to_pem
from protocol.labels import parse_selector

log = logging.getLogger("modelfleet.control_plane")


async def post_enrollment_token(request: web.Request) -> web.Response:
    """Create an enrollment token."""
    state = st(request)
    body = await read_json(request)
    req = fleet.EnrollmentTokenRequest.parse(body, state.config.enrollment_token_ttl_s)
    out = await fleet.create_enrollment_token(state.db, req, state.clock())
    return json_response(out, 201)


async def post_enroll(request: web.Request) -> web.Response:
    """Enroll an agent with an enrollment token; returns its credential and the keys it needs."""
    state = st(request)
    body = await read_json(request)
    req = fleet.EnrollRequest.parse(body)
    agent, credential, mqtt_password = await fleet.enroll(
        state.db, state.signer, req, state.clock(), state.config.credential_cost
    )
    log.info("enrolled agent %s (%s) labels=%s", agent["agentId"], agent["name"], agent["labels"])
    found = await keyset.latest(state.db)
    trust = keyset.trust_of(found[0] if found else None, state.trusted)
    out = {
        **agent,
        "credential": credential,
        "controlPlaneKey": public_key_to_pem(state.signer.key.public_key()).decode(),
        "trustedPublishers": [public_key_to_pem(k).decode() for k in trust.keys.values()],
        "heartbeatSeconds": state.config.heartbeat_s,
    }
    if found is not None:
        out["keyset"] = found[1]  # the agent trusts it as it trusts this answer (TLS)
    cfg = state.config
    if cfg.mqtt_url:
        out["mqtt"] = {
            "url": cfg.mqtt_public_url or cfg.mqtt_url,
            "username": agent["agentId"],
            "password": mqtt_password,
            "prefix": cfg.mqtt_prefix,
        }
    return json_response(out, 201)


async def get_agents(request: web.Request) -> web.Response:
    """List agents."""
    state = st(request)
    text = request.query.get("selector")
    selector = parse_selector(text) if text else None
    agents = await fleet.list_agents(
        state.db, state.clock(), state.config.offline_after_s, selector
    )
    return json_response({"agents": agents})


async def get_agent(request: web.Request) -> web.Response:
    """One agent."""
    agent_id = request.match_info["id"]
    state = st(request)
    return json_response(
        await fleet.get_agent(state.db, agent_id, state.clock(), state.config.offline_after_s)
    )


async def get_desired(request: web.Request) -> web.Response:
    """Long-poll for a desired state newer than ``after``; 204 when none came within ``wait``."""
    agent_id = request.match_info["id"]
    state = st(request)
    after = int(query_number(request, "after", 0, 2**62))
    wait = query_number(request, "wait", 0, state.config.long_poll_max_s)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while True:
        row = await desired.current(state.db, agent_id)
        if row is not None:
            row = await desired.refresh_if_expiring(state.db, state.signer, row, state.clock())
            if row.generation > after:
                return web.Response(
                    body=row.envelope.encode(),
                    content_type="application/json",
                    headers={"X-Modelfleet-Generation": str(row.generation)},
                )
        remaining = deadline - loop.time()
        if remaining <= 0 or state.draining.is_set():
            return web.Response(status=204)  # draining: the agent asks again elsewhere / later
        # No session is open here: a waiting long-poll holds a connection, never a database one.
        state.polling[agent_id] = state.polling.get(agent_id, 0) + 1
        try:
            await state.notifier.wait(agent_id, min(remaining, state.config.long_poll_recheck_s))
        finally:
            state.polling[agent_id] -= 1
            if not state.polling[agent_id]:
                del state.polling[agent_id]


async def post_credential(request: web.Request) -> web.Response:
    """A new credential for the calling agent; the old one works until the new one is used."""
    agent_id = request.match_info["id"]
    state = st(request)
    credential = await credentials.rotate(state.db, agent_id, state.config.credential_cost)
    return json_response({"agentId": agent_id, "credential": credential})


async def post_approve(request: web.Request) -> web.Response:
    """Approve an agent that enrolled with a token requiring approval."""
    state = st(request)
    agent_id = request.match_info["id"]
    changed = await credentials.approve(state.db, state.signer, agent_id, state.clock())
    state.notifier.notify(changed)
    return json_response({"agentId": agent_id, "approved": True})


async def post_labels(request: web.Request) -> web.Response:
    """Relabel an agent: set and remove labels (not those its enrollment token locked)."""
    state = st(request)
    agent_id = request.match_info["id"]
    req = fleet.RelabelRequest.parse(await read_json(request))
    labels, moved = await fleet.relabel(state.db, state.signer, agent_id, req, state.clock())
    if moved:
        state.notifier.notify([agent_id])
    log.info("relabelled agent %s: %s", agent_id, labels)
    return json_response({"agentId": agent_id, "labels": labels, "desiredChanged": moved})


async def post_revoke(request: web.Request) -> web.Response:
    """Revoke an agent: its credential, its broker password and its desired state go at once."""
    state = st(request)
    agent_id = request.match_info["id"]
    await credentials.revoke(state.db, agent_id, state.clock())
    state.notifier.notify([agent_id])  # wakes its long-poll; the MQTT bridge clears its topic
    return json_response({"agentId": agent_id, "revoked": True})


ROUTES = (
    Route(
        "POST",
        "/api/v1/enrollment-tokens",
        post_enrollment_token,
        summary="Create an enrollment token",
        auth="operator",
        body="application/json",
        responses=(201, 400),
        scope="admin",
    ),
    Route(
        "POST",
        "/api/v1/agents/enroll",
        post_enroll,
        summary="Enroll an agent",
        auth="none",
        body="application/json",
        responses=(201, 400, 401, 403),
    ),
    Route("GET", "/api/v1/agents", get_agents, summary="List agents", auth="operator"),
    Route(
        "GET",
        "/api/v1/agents/{id}",
        get_agent,
        summary="One agent",
        auth="agent-or-operator",
        responses=(200, 403, 404),
    ),
    Route(
        "GET",
        "/api/v1/agents/{id}/desired",
        get_desired,
        summary="Long-poll the agent's signed desired state",
        auth="agent-or-operator",
        responses=(200, 204, 403),
    ),
    Route(
        "POST",
        "/api/v1/agents/{id}/credential",
        post_credential,
        summary="Rotate the agent's credential (its own credential only)",
        auth="agent",
        body="application/json",
        responses=(200, 403, 404),
    ),
    Route(
        "POST",
        "/api/v1/agents/{id}/approve",
        post_approve,
        summary="Approve an agent waiting for approval",
        auth="operator",
        body="application/json",
        responses=(200, 404),
        scope="admin",
    ),
    Route(
        "POST",
        "/api/v1/agents/{id}/labels",
        post_labels,
        summary="Set and remove an agent's labels",
        auth="operator",
        body="application/json",
        responses=(200, 400, 403, 404),
        scope="admin",
    ),
    Route(
        "POST",
        "/api/v1/agents/{id}/revoke",
        post_revoke,
        summary="Revoke an agent at once",
        auth="operator",
        body="application/json",
        responses=(200, 404),
        scope="admin",
    ),
)
