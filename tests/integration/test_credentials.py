"""Agent credentials: rotation with no downtime, revocation that cuts the agent off."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

from sqlalchemy import select

from control_plane.db.models import Agent
from control_plane.state import STATE
from tests.support.agents import enroll_agent, eventually, running_agent, wait_active
from tests.support.bundles import Publisher, iris_bundle
from tests.support.control_plane import ControlPlane
from tests.support.fleet import MODELFLEET


async def agent_call(cp: ControlPlane, credential: str, agent_id: str) -> int:
    return (await cp.call("GET", f"/agents/{agent_id}", token=credential)).status


async def test_rotation_keeps_the_agent_working_and_retires_the_old_credential(
    cp_sqlite: ControlPlane, publisher: Publisher, tmp_path: Path
) -> None:
    cp = cp_sqlite
    await cp.push(iris_bundle(publisher.key))
    await cp.push(iris_bundle(publisher.key, version="2.0.0", seed=1))
    ident = await enroll_agent(cp, tmp_path / "a", {"site": "x"})
    old = ident.credential
    async with running_agent(tmp_path / "a") as agent:
        await cp.rollout(selector="site=x")
        await wait_active(cp, ident.agent_id, "1.0.0")
        p = await asyncio.to_thread(
            subprocess.run,
            [MODELFLEET, "agent", "rotate-credential", "--state-dir", str(tmp_path / "a")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert p.returncode == 0, p.stderr
        new = agent.dirs.load_identity().credential
        assert new != old and new.startswith("mfc_")
        # Both work until the new one is used: the running agent is never locked out.
        assert await agent_call(cp, old, ident.agent_id) == 200
        agent.reload(agent.config)  # what SIGHUP does: the daemon picks the new one up

        async def retired() -> bool:
            async with cp.client.app[STATE].db.read() as s:
                a = await s.scalar(select(Agent).where(Agent.id == ident.agent_id))
                return a is not None and a.next_credential_hash is None

        await eventually(retired)
        assert await agent_call(cp, old, ident.agent_id) == 401
        assert await agent_call(cp, new, ident.agent_id) == 200
        # The agent goes on working with it: a new rollout reaches it.
        await cp.rollout(version="2.0.0", selector="site=x")
        await wait_active(cp, ident.agent_id, "2.0.0")
    # Another agent's credential cannot rotate this one's.
    other = await cp.enroll({"site": "y"})
    r = await cp.call("POST", f"/agents/{ident.agent_id}/credential", token=other["credential"])
    assert r.status == 403


async def test_revocation_cuts_the_agent_off_at_once(
    cp: ControlPlane, publisher: Publisher, tmp_path: Path
) -> None:
    await cp.push(iris_bundle(publisher.key))
    a = await cp.enroll({"site": "x"})
    aid, cred = a["agentId"], a["credential"]
    await cp.rollout(selector="site=x")
    assert await agent_call(cp, cred, aid) == 200
    reader = await cp.call("POST", "/tokens", json={"name": "r", "scopes": ["fleet:read"]})
    r = await cp.call("POST", f"/agents/{aid}/revoke", token=(await reader.json())["token"])
    assert r.status == 403  # revoking needs admin
    r = await cp.call("POST", f"/agents/{aid}/revoke")
    assert r.status == 200 and (await r.json())["revoked"] is True
    assert await agent_call(cp, cred, aid) == 401
    r = await cp.call("GET", f"/agents/{aid}/desired", token=cred, params={"wait": "0"})
    assert r.status == 401
    view = await (await cp.call("GET", f"/agents/{aid}")).json()
    assert view["state"] == "revoked" and view["desiredGeneration"] == 0
    async with cp.client.app[STATE].db.read() as s:
        row = await s.get(Agent, aid)
        assert row is not None and row.mqtt_password_hash is None
    p = await asyncio.to_thread(
        subprocess.run,
        [MODELFLEET, "agents", "revoke", aid, "--server", cp.url, "--token", cp.token],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0 and "revoked" in p.stdout, p.stderr  # idempotent
    assert (await cp.call("POST", "/agents/nope/revoke")).status == 404


async def test_enrollment_waiting_for_approval(cp: ControlPlane, publisher: Publisher) -> None:
    r = await cp.push(iris_bundle(publisher.key))
    digest = (await r.json())["manifestDigest"]
    r = await cp.call(
        "POST", "/enrollment-tokens", json={"labels": {"site": "x"}, "requireApproval": True}
    )
    assert r.status == 201 and (await r.json())["requireApproval"] is True
    token = (await r.json())["token"]
    r = await cp.call("POST", "/agents/enroll", token="", json={"token": token})
    a = await r.json()
    assert r.status == 201 and a["pending"] is True
    aid, cred = a["agentId"], a["credential"]
    await cp.rollout(selector="site=x")
    view = await (await cp.call("GET", f"/agents/{aid}")).json()
    assert view["state"] == "pending" and view["desiredGeneration"] == 0
    # It may be seen and wait, nothing more.
    r = await cp.call("GET", f"/agents/{aid}/desired", token=cred, params={"wait": "0"})
    assert r.status == 204
    r = await cp.call(
        "POST",
        f"/agents/{aid}/status",
        token=cred,
        json={"agentId": aid, "generation": 0, "models": [], "sentAt": "2026-11-25T00:00:00Z"},
    )
    assert r.status == 200
    r = await cp.call("GET", f"/manifests/{digest}", token=cred)
    assert r.status == 403 and (await r.json())["error"]["code"] == "pending_approval"
    assert (
        await cp.call("POST", "/enrollment-tokens", json={"requireApproval": "yes"})
    ).status == 400
    p = await asyncio.to_thread(
        subprocess.run,
        [MODELFLEET, "agents", "approve", aid, "--server", cp.url, "--token", cp.token],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    # Approved: the completed rollout places its version on it, downloads are open.
    r = await cp.call("GET", f"/agents/{aid}/desired", token=cred, params={"wait": "5"})
    assert r.status == 200 and b"payload" in await r.read()
    assert (await cp.call("GET", f"/manifests/{digest}", token=cred)).status == 200
    view = await (await cp.call("GET", f"/agents/{aid}")).json()
    assert view["state"] != "pending" and view["desiredGeneration"] == 1


async def test_a_credential_stored_before_scrypt_survives_the_migration_and_is_re_stored(
    tmp_path: Path, publisher: Publisher, db_url: str
) -> None:
    """An agent enrolled by a version that stored a bare sha256 keeps working after the
    upgrade, and its first request re-stores the credential as scrypt."""
    import hashlib
    import uuid
    from datetime import UTC, datetime

    from alembic import command
    from sqlalchemy import text

    from control_plane.db.engine import Database, alembic_config
    from tests.support.control_plane import cp_config, start_control_plane

    db = Database(db_url)
    credential = "mfc_" + uuid.uuid4().hex + uuid.uuid4().hex
    legacy = hashlib.sha256(credential.encode()).hexdigest()
    agent_id = str(uuid.uuid4())

    def to_0009(conn):  # type: ignore[no-untyped-def]
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0009")

    try:
        async with db.engine.begin() as conn:
            await conn.run_sync(to_0009)
            await conn.execute(
                text(
                    "INSERT INTO agents (id, name, labels, facts, credential_hash, enrolled_at, "
                    "reported_generation, status, pending) VALUES (:id, 'old', '{}', '{}', :h, :t, "
                    "0, '{}', false)"
                ),
                {"id": agent_id, "h": legacy, "t": datetime.now(UTC)},
            )
    finally:
        await db.close()
    cp = await start_control_plane(cp_config(tmp_path, db_url, publisher))  # migrates to head
    try:
        assert await agent_call(cp, credential, agent_id) == 200
        assert await agent_call(cp, credential[:-1] + "A", agent_id) == 401
        async with cp.client.app[STATE].db.read() as s:
            a = await s.scalar(select(Agent).where(Agent.id == agent_id))
        assert a is not None and a.credential_hash.startswith("scrypt$")
        assert legacy not in a.credential_hash
        assert await agent_call(cp, credential, agent_id) == 200  # and it still works
        fresh = await cp.enroll({"site": "x"})
        async with cp.client.app[STATE].db.read() as s:
            b = await s.scalar(select(Agent).where(Agent.id == fresh["agentId"]))
        assert b is not None and b.credential_hash.startswith("scrypt$12$8$1$")
    finally:
        await cp.client.close()
