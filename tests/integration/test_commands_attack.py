"""An attacker's pass over operator commands at the REST edge (issue 17), on SQLite and
PostgreSQL: racing answers and issues, bodies without a length, ids that are not ids, and who
may read what. Each test names the attack; what held stays here so it keeps holding."""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import select
from yarl import URL

from control_plane.db.engine import Database
from control_plane.db.models import AgentCommand
from tests.integration.test_access import make_token
from tests.integration.test_commands_api import answer, issue, poll
from tests.support.control_plane import ControlPlane, assert_error


async def stored(cp: ControlPlane, agent_id: str) -> list[AgentCommand]:
    db = Database(cp.config.database_url)
    try:
        async with db.read() as s:
            return list(
                await s.scalars(select(AgentCommand).where(AgentCommand.agent_id == agent_id))
            )
    finally:
        await db.close()


async def test_concurrent_answers_to_one_command_store_exactly_one(cp: ControlPlane) -> None:
    agent = await cp.enroll()
    cid = (await issue(cp, agent["agentId"], maxBytes=4096))["commandId"]
    assert len(await poll(cp, agent)) == 1
    bodies = [f"answer {i}\n".encode() for i in range(8)]
    answers = await asyncio.gather(*(answer(cp, agent, cid, b) for b in bodies))
    statuses = sorted(r.status for r in answers)
    assert statuses == [200] + [409] * 7, statuses
    winner = next(b for b, r in zip(bodies, answers, strict=True) if r.status == 200)
    r = await cp.call("GET", f"/agents/{agent['agentId']}/commands/{cid}/answer")
    assert await r.read() == winner


async def test_a_burst_of_concurrent_issues_stays_within_max_pending(cp: ControlPlane) -> None:
    agent = await cp.enroll()
    cap = cp.config.max_pending_commands
    path = f"/agents/{agent['agentId']}/commands"
    answers = await asyncio.gather(
        *(cp.call("POST", path, json={"kind": "logs"}) for _ in range(3 * cap))
    )
    statuses = [r.status for r in answers]
    assert statuses.count(202) == cap and statuses.count(409) == 2 * cap, statuses
    assert len(await stored(cp, agent["agentId"])) == cap


async def test_a_chunked_body_over_max_bytes_is_refused_while_it_streams(
    cp: ControlPlane,
) -> None:
    agent = await cp.enroll()
    cid = (await issue(cp, agent["agentId"], maxBytes=2048))["commandId"]
    assert len(await poll(cp, agent)) == 1
    # A raw connection: chunked, no Content-Length, and the body never finishes; the answer
    # must come once the cap is passed, not when the (endless) body ends.
    url = URL(cp.url)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(
            (
                f"POST /api/v1/agents/{agent['agentId']}/commands/{cid}/answer HTTP/1.1\r\n"
                f"Host: {url.host}\r\nAuthorization: Bearer {agent['credential']}\r\n"
                "Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
            ).encode()
        )
        for _ in range(3):
            writer.write(b"400\r\n" + b"x" * 1024 + b"\r\n")
        await writer.drain()
        async with asyncio.timeout(20):
            status_line = await reader.readline()
        assert b" 413 " in status_line, status_line
    finally:
        writer.close()
    (row,) = await stored(cp, agent["agentId"])
    assert row.state == "delivered" and row.answer is None
    # A declared length over the cap is refused before a byte is read.
    await assert_error(await answer(cp, agent, cid, b"y" * 4096), 413, "answer_too_large")
    # The command still takes an honest answer.
    r = await answer(cp, agent, cid, b"fits")
    assert r.status == 200, await r.text()


async def test_ids_that_are_not_ids_are_refused_not_crashed_on(cp: ControlPlane) -> None:
    agent = await cp.enroll()
    cid = (await issue(cp, agent["agentId"]))["commandId"]
    me = agent["agentId"]
    for bad_cid in ("%00", "a%00b", "..%2F..%2Fagents", "x" * 300, "%E2%80%AE", cid.upper()):
        for path in (f"/agents/{me}/commands/{bad_cid}", f"/agents/{me}/commands/{bad_cid}/answer"):
            r = await cp.call("GET", path)
            assert r.status in (400, 404), (path, r.status, await r.text())
    for bad_agent in ("%00", "a%00b", "x" * 300):
        r = await cp.call("POST", f"/agents/{bad_agent}/commands", json={"kind": "logs"})
        assert r.status in (400, 404), (bad_agent, r.status, await r.text())
        r = await cp.call("GET", f"/agents/{bad_agent}/commands/{cid}")
        assert r.status in (400, 404), (bad_agent, r.status, await r.text())


async def test_an_agent_credential_cannot_read_commands_or_answers(cp: ControlPlane) -> None:
    agent, other = await cp.enroll(), await cp.enroll()
    cid = (await issue(cp, agent["agentId"]))["commandId"]
    assert len(await poll(cp, agent)) == 1
    assert (await answer(cp, agent, cid, b"my logs")).status == 200
    base = f"/agents/{agent['agentId']}/commands/{cid}"
    for who in (agent, other):
        for path in (base, f"{base}/answer"):
            await assert_error(await cp.call("GET", path, who["credential"]), 403)
    # Nor take another agent's commands from its long-poll.
    cid2 = (await issue(cp, agent["agentId"]))["commandId"]
    r = await cp.call("GET", f"/agents/{agent['agentId']}/commands", other["credential"])
    await assert_error(r, 403)
    rows = {row.id: row.state for row in await stored(cp, agent["agentId"])}
    assert rows[cid2] == "pending"


async def test_max_bytes_and_since_seconds_out_of_range_are_400_naming_the_field(
    cp: ControlPlane,
) -> None:
    agent = await cp.enroll()
    path = f"/agents/{agent['agentId']}/commands"
    bad: list[tuple[dict[str, Any], str]] = [
        ({"maxBytes": 1023}, "maxBytes"),
        ({"maxBytes": 8 * 1024 * 1024 + 1}, "maxBytes"),
        ({"maxBytes": "1024"}, "maxBytes"),
        ({"maxBytes": 1e400}, "maxBytes"),
        ({"maxBytes": True}, "maxBytes"),
        ({"sinceSeconds": 0}, "sinceSeconds"),
        ({"sinceSeconds": -5}, "sinceSeconds"),
        ({"sinceSeconds": 7 * 86400 + 1}, "sinceSeconds"),
        ({"sinceSeconds": 1.5}, "sinceSeconds"),
        ({"ttlSeconds": 10**6}, "ttlSeconds"),
        ({"ttlSeconds": 9}, "ttlSeconds"),
    ]
    for body, field in bad:
        await assert_error(
            await cp.call("POST", path, json={"kind": "logs", **body}), 400, field=field
        )
    assert await stored(cp, agent["agentId"]) == []


async def test_the_audit_names_the_operator_who_issued_and_who_fetched(cp: ControlPlane) -> None:
    agent = await cp.enroll()
    made = await make_token(cp, ["agents:diagnose"])
    diag = made["token"]
    cid = (await issue(cp, agent["agentId"], diag))["commandId"]
    assert len(await poll(cp, agent)) == 1
    assert (await answer(cp, agent, cid, b"logs")).status == 200
    assert (
        await cp.call("GET", f"/agents/{agent['agentId']}/commands/{cid}/answer", diag)
    ).status == 200
    events = (await (await cp.call("GET", "/audit")).json())["events"]
    mine = [e for e in events if e["actor"].startswith(f"token:{made['id']}")]
    actions = {e["action"] for e in mine}
    assert "POST /api/v1/agents/{id}/commands" in actions, mine
    assert "GET /api/v1/agents/{id}/commands/{cid}/answer" in actions, mine
