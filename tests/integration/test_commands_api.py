"""Operator commands through the control plane's REST API, with the agent's side played by
its own credential: issue, long-poll, verify the signature, answer once; every refusal."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from control_plane.db.engine import Database
from control_plane.db.models import AgentCommand
from protocol.commands import accept_command
from protocol.digest import sha256_digest
from protocol.dsse import keyring, load_public_key
from tests.integration.test_access import make_token
from tests.support.agents import eventually
from tests.support.bundles import Publisher
from tests.support.control_plane import (
    ControlPlane,
    assert_error,
    cp_config,
    start_control_plane,
)

OCTETS = {"Content-Type": "application/octet-stream"}


async def issue(cp: ControlPlane, agent_id: str, token: str | None = None, **body: Any) -> Any:
    r = await cp.call("POST", f"/agents/{agent_id}/commands", token, json={"kind": "logs", **body})
    assert r.status == 202, await r.text()
    return await r.json()


async def poll(cp: ControlPlane, agent: dict[str, Any], wait: float = 0) -> list[str]:
    r = await cp.call(
        "GET",
        f"/agents/{agent['agentId']}/commands",
        agent["credential"],
        params={"wait": str(wait)},
    )
    if r.status == 204:
        return []
    assert r.status == 200, await r.text()
    return (await r.json())["commands"]


async def answer(cp: ControlPlane, agent: dict[str, Any], cid: str, data: bytes) -> Any:
    return await cp.call(
        "POST",
        f"/agents/{agent['agentId']}/commands/{cid}/answer",
        agent["credential"],
        data=data,
        headers=OCTETS,
    )


async def test_a_command_goes_to_its_agent_signed_and_its_answer_comes_back_once(
    cp: ControlPlane,
) -> None:
    agent = await cp.enroll({"site": "a"})
    diag = (await make_token(cp, ["agents:diagnose"]))["token"]
    out = await issue(cp, agent["agentId"], diag, sinceSeconds=120, maxBytes=4096)
    assert out["state"] == "pending" and out["kind"] == "logs"
    cid = out["commandId"]

    # The long-poll hands it over once, signed by the control plane's key for this agent.
    got = await poll(cp, agent)
    assert len(got) == 1
    keys = keyring([load_public_key(agent["controlPlaneKey"].encode())])
    cmd = accept_command(got[0].encode(), keys, agent["agentId"], datetime.now(UTC))
    assert (cmd.command_id, cmd.since_s, cmd.max_bytes) == (cid, 120, 4096)
    assert await poll(cp, agent) == []
    r = await cp.call("GET", f"/agents/{agent['agentId']}/commands/{cid}", diag)
    assert (await r.json())["state"] == "delivered"
    assert (await r.json())["deliveredVia"] == "http"

    # The operator waits for the answer; it arrives meanwhile.
    waiting = asyncio.create_task(
        cp.call("GET", f"/agents/{agent['agentId']}/commands/{cid}", diag, params={"wait": "20"})
    )
    lines = b"line one\nline two\n"
    r = await answer(cp, agent, cid, lines)
    assert r.status == 200, await r.text()
    state = await (await waiting).json()
    assert state["state"] == "answered" and state["answeredVia"] == "http"
    assert state["answerBytes"] == len(lines) and state["answerDigest"] == sha256_digest(lines)

    r = await cp.call("GET", f"/agents/{agent['agentId']}/commands/{cid}/answer", diag)
    assert r.status == 200 and await r.read() == lines
    assert r.headers["X-Modelfleet-Digest"] == sha256_digest(lines)
    assert r.headers["Content-Type"].startswith("text/plain")

    # Once: a second answer is refused and the first one stays.
    await assert_error(await answer(cp, agent, cid, b"forged"), 409, "already_answered")
    r = await cp.call("GET", f"/agents/{agent['agentId']}/commands/{cid}/answer", diag)
    assert await r.read() == lines

    # Audited: the issue (a change) and the fetch of the answer (a read, audited on purpose).
    events = (await (await cp.call("GET", "/audit")).json())["events"]
    actions = [(e["actor"], e["action"], e["outcome"]) for e in events]
    assert any(
        a.startswith("token:") and act == "POST /api/v1/agents/{id}/commands" and o == 202
        for a, act, o in actions
    ), actions
    fetched = [e for e in events if e["action"] == "GET /api/v1/agents/{id}/commands/{cid}/answer"]
    assert len(fetched) == 2 and fetched[0]["detail"]["bytes"] == len(lines)
    assert fetched[0]["actor"].startswith("token:") and "agents:diagnose" in fetched[0]["actor"]


async def test_without_the_scope_every_operator_route_is_403_naming_it(cp: ControlPlane) -> None:
    agent = await cp.enroll()
    cid = (await issue(cp, agent["agentId"]))["commandId"]
    for scopes in (["fleet:read"], ["rollouts:write", "config:write"]):
        token = (await make_token(cp, scopes))["token"]
        base = f"/agents/{agent['agentId']}/commands"
        for method, path in (
            ("POST", base),
            ("GET", f"{base}/{cid}"),
            ("GET", f"{base}/{cid}/answer"),
        ):
            kw = {"json": {"kind": "logs"}} if method == "POST" else {}
            body = await assert_error(
                await cp.call(method, path, token, **kw), 403, "insufficient_scope", "scope"
            )
            assert "agents:diagnose" in body["error"]["message"]
    # An agent cannot ask itself (or another agent) anything, nor read answers.
    r = await cp.call(
        "POST", f"/agents/{agent['agentId']}/commands", agent["credential"], json={"kind": "logs"}
    )
    await assert_error(r, 403)


async def test_hostile_answers_are_refused_and_change_nothing(cp: ControlPlane) -> None:
    me, other = await cp.enroll(), await cp.enroll()
    cid = (await issue(cp, me["agentId"], maxBytes=2048))["commandId"]
    assert len(await poll(cp, me)) == 1

    # Over the command's maxBytes: 413 while the body streams, nothing stored.
    await assert_error(await answer(cp, me, cid, b"x" * 2049), 413, "answer_too_large", "answer")
    # Another agent's command, on the other agent's own route: refused by the command's owner.
    await assert_error(await answer(cp, other, cid, b"mine"), 403, "not_this_agents")
    # Another agent's route with my credential: refused at the door.
    r = await cp.call(
        "POST",
        f"/agents/{other['agentId']}/commands/{cid}/answer",
        me["credential"],
        data=b"x",
        headers=OCTETS,
    )
    await assert_error(r, 403, "forbidden")
    # Unsolicited: no such command, or not a command id at all.
    await assert_error(
        await answer(cp, me, "6f1c1f7e-3c1a-4e0a-9d4b-2f0c2b9a1e55", b"x"), 404, "unknown_command"
    )
    await assert_error(await answer(cp, me, "not-a-uuid", b"x"), 400, "invalid", "commandId")
    r = await cp.call("GET", f"/agents/{me['agentId']}/commands/{cid}")
    assert (await r.json())["state"] == "delivered"
    await assert_error(
        await cp.call("GET", f"/agents/{me['agentId']}/commands/{cid}/answer"), 409, "no_answer"
    )

    # Past its expiry (moved back in the database: the clock is real), an answer is refused.
    db = Database(cp.config.database_url)
    try:
        async with db.write() as s:
            await s.execute(
                update(AgentCommand)
                .where(AgentCommand.id == cid)
                .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
            )
    finally:
        await db.close()
    await assert_error(await answer(cp, me, cid, b"late"), 409, "command_expired")
    r = await cp.call("GET", f"/agents/{me['agentId']}/commands/{cid}")
    assert (await r.json())["state"] == "expired"
    # An expired command is not handed over either.
    assert await poll(cp, me) == []


async def test_a_failure_is_stored_once_and_shown(cp: ControlPlane) -> None:
    agent = await cp.enroll()
    cid = (await issue(cp, agent["agentId"], kind="diagnose", maxBytes=1024))["commandId"]
    path = f"/agents/{agent['agentId']}/commands/{cid}/failure"
    await assert_error(
        await cp.call("POST", path, agent["credential"], json={"error": 5}), 400, field="error"
    )
    r = await cp.call("POST", path, agent["credential"], json={"error": "needs 3000 bytes"})
    assert r.status == 200, await r.text()
    state = await (await cp.call("GET", f"/agents/{agent['agentId']}/commands/{cid}")).json()
    assert state["state"] == "failed" and state["error"] == "needs 3000 bytes"
    body = await assert_error(
        await cp.call("GET", f"/agents/{agent['agentId']}/commands/{cid}/answer"), 409
    )
    assert "needs 3000 bytes" in body["error"]["message"]
    await assert_error(await answer(cp, agent, cid, b"x"), 409, "already_answered")


async def test_issue_refusals(cp: ControlPlane) -> None:
    agent = await cp.enroll()
    path = f"/agents/{agent['agentId']}/commands"
    await assert_error(await cp.call("POST", path, json={"kind": "shell"}), 400, field="kind")
    await assert_error(
        await cp.call("POST", path, json={"kind": "logs", "maxBytes": 10**9}), 400, field="maxBytes"
    )
    await assert_error(
        await cp.call(
            "POST", "/agents/6f1c1f7e-3c1a-4e0a-9d4b-2f0c2b9a1e55/commands", json={"kind": "logs"}
        ),
        404,
        "agent_not_found",
    )
    for _ in range(cp.config.max_pending_commands):
        await issue(cp, agent["agentId"])
    await assert_error(await cp.call("POST", path, json={"kind": "logs"}), 409, "too_many_commands")
    # Handed over, they still wait for answers: the cap holds until they are answered.
    assert len(await poll(cp, agent)) == cp.config.max_pending_commands
    await assert_error(await cp.call("POST", path, json={"kind": "logs"}), 409, "too_many_commands")
    r = await cp.call("POST", f"/agents/{agent['agentId']}/revoke", json={})
    assert r.status == 200
    await assert_error(await cp.call("POST", path, json={"kind": "logs"}), 409)


async def test_answers_past_retention_go_without_another_issue(
    tmp_path: Path, db_url: str, publisher: Publisher
) -> None:
    # The retention pass runs beside the metric roll-up: an answer past retention is deleted
    # although nobody issues a command again (issuing used to be the only thing that pruned).
    config = dataclasses.replace(
        cp_config(tmp_path, db_url, publisher), rollup_interval_s=0.1, command_retention_s=60.0
    )
    cp = await start_control_plane(config)
    db = Database(cp.config.database_url)
    try:
        me = await cp.enroll()
        old = (await issue(cp, me["agentId"], kind="logs"))["commandId"]
        fresh = (await issue(cp, me["agentId"], kind="logs"))["commandId"]
        assert len(await poll(cp, me)) == 2  # both handed over
        for cid in (old, fresh):
            assert (await answer(cp, me, cid, b"lines")).status == 200
        async with db.write() as s:  # answered two minutes ago (the clock is real)
            await s.execute(
                update(AgentCommand)
                .where(AgentCommand.id == old)
                .values(answered_at=datetime.now(UTC) - timedelta(seconds=120))
            )

        async def kept() -> set[str] | None:
            async with db.read() as s:
                ids = set(await s.scalars(select(AgentCommand.id)))
            return ids if ids == {fresh} else None

        assert await eventually(kept, 15) == {fresh}
        r = await cp.call("GET", f"/agents/{me['agentId']}/commands/{fresh}/answer")
        assert r.status == 200 and await r.read() == b"lines"
    finally:
        await db.close()
        await cp.client.close()
