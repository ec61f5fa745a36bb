"""Least privilege as a matrix: every route x every scope, agent credentials against operator
routes; API tokens that expire and are revoked; the hash-chained audit log."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import text

from control_plane.api.routes import ROUTES
from control_plane.security.ratelimit import RateLimiter
from control_plane.security.scopes import SCOPES
from control_plane.state import STATE
from tests.support.bundles import Publisher, iris_bundle
from tests.support.control_plane import ControlPlane, cp_config, start_control_plane
from tests.support.fleet import run_cli


async def make_token(cp: ControlPlane, scopes: list[str], **extra: Any) -> dict[str, Any]:
    r = await cp.call("POST", "/tokens", json={"name": "-".join(scopes), "scopes": scopes, **extra})
    assert r.status == 201, await r.text()
    return await r.json()


def concrete(path: str, ids: dict[str, str]) -> str:
    for key, value in ids.items():
        path = path.replace("{" + key + "}", value)
    return path.removeprefix("/api/v1")


async def test_every_route_against_every_scope_and_agent_credentials(
    cp: ControlPlane, publisher: Publisher
) -> None:
    r = await cp.push(iris_bundle(publisher.key))
    digest = (await r.json())["manifestDigest"]
    me = await cp.enroll({"site": "a"})
    other = await cp.enroll({"site": "b"})
    tokens = {scope: (await make_token(cp, [scope]))["token"] for scope in SCOPES}
    victim = await make_token(cp, ["fleet:read"])  # the DELETE route revokes this one
    victim_agent = await cp.enroll({"site": "c"})  # and the revoke route this one
    ids = {"name": "iris", "digest": digest, "id": str(uuid.uuid4()), "action": "pause"}
    ids["cid"] = str(uuid.uuid4())  # a command id no agent has
    checked = 0
    for route in ROUTES:
        if route.auth == "none":
            continue
        if "/tokens/" in route.path:
            ids["id"] = str(victim["id"])
        elif route.path.endswith("/revoke"):
            ids["id"] = victim_agent["agentId"]  # revoking `me` would end the matrix
        elif "/agents/{id}" in route.path:
            ids["id"] = me["agentId"]
        else:
            ids["id"] = str(uuid.uuid4())
        path = concrete(route.path, ids)
        kw: dict[str, Any] = {}
        if route.body == "application/json":
            kw["json"] = {}
        elif route.body:
            kw["data"] = b"not a bundle"
        if "/desired" in path:
            kw["params"] = {"wait": "0"}
        for scope, token in tokens.items():
            resp = await cp.call(route.method, path, token=token, **kw)
            body = await resp.read()
            allowed = route.auth != "agent" and (scope == "admin" or scope == route.scope)
            if allowed:
                assert resp.status not in (401, 403), (route.method, path, scope, body)
            else:
                assert resp.status == 403, (route.method, path, scope, resp.status, body)
                if route.auth != "agent":
                    assert json.loads(body)["error"]["code"] == "insufficient_scope"
                    assert route.scope in json.loads(body)["error"]["message"]
            checked += 1
        # An agent's credential: its own agent routes and downloads only.
        resp = await cp.call(route.method, path, token=me["credential"], **kw)
        if route.auth in ("operator",):
            assert resp.status == 403, (route.method, path, "agent")
        else:
            assert resp.status not in (401, 403), (route.method, path, "agent", await resp.read())
        if "/agents/{id}" in route.path:  # another agent's routes
            resp = await cp.call(route.method, path, token=other["credential"], **kw)
            assert resp.status == 403, (route.method, path, "other agent")
        # No token, and a made-up one.
        for bad in ("", "mfa_not-a-real-token"):
            resp = await cp.call(route.method, path, token=bad, **kw)
            assert resp.status == 401, (route.method, path, bad)
    assert checked >= 20 * len(SCOPES)


async def test_tokens_expire_and_revoke_at_once(cp: ControlPlane) -> None:
    t = await make_token(cp, ["fleet:read"], ttlSeconds=60)
    assert t["state"] == "active" and t["expiresAt"] and t["scopes"] == ["fleet:read"]
    assert (await cp.call("GET", "/fleet", token=t["token"])).status == 200
    listed = (await (await cp.call("GET", "/tokens")).json())["tokens"]
    assert all("token" not in x and "token_hash" not in x for x in listed)
    assert {x["id"] for x in listed} >= {t["id"]}
    r = await cp.call("DELETE", f"/tokens/{t['id']}")
    assert r.status == 200 and (await r.json())["state"] == "revoked"
    assert (await cp.call("GET", "/fleet", token=t["token"])).status == 401
    # Expired: move the expiry into the past.
    e = await make_token(cp, ["fleet:read"], ttlSeconds=60)
    async with cp.client.app[STATE].db.write() as s:
        await s.execute(
            text("UPDATE api_tokens SET expires_at = '2000-01-01 00:00:00+00:00' WHERE id = :i"),
            {"i": e["id"]},
        )
    assert (await cp.call("GET", "/fleet", token=e["token"])).status == 401
    # Bad bodies name the field and store nothing.
    before = len((await (await cp.call("GET", "/tokens")).json())["tokens"])
    admin = {"name": "x", "scopes": ["admin"]}
    bad_bodies = [
        ({"scopes": ["admin"]}, "name"),
        ({"name": "x"}, "scopes"),
        ({"name": "x", "scopes": []}, "scopes"),
        ({**admin, "scopes": ["root"]}, "scopes"),
        ({**admin, "scopes": "admin"}, "scopes"),
        ({**admin, "ttlSeconds": 5}, "ttlSeconds"),
        ({**admin, "ttlSeconds": "1h"}, "ttlSeconds"),
    ]
    for body, field in bad_bodies:
        r = await cp.call("POST", "/tokens", json=body)
        assert r.status == 400 and (await r.json())["error"]["field"] == field, body
    assert len((await (await cp.call("GET", "/tokens")).json())["tokens"]) == before
    assert (await cp.call("DELETE", "/tokens/99999")).status == 404
    assert (await cp.call("DELETE", "/tokens/abc")).status == 400


async def test_audit_log_records_changes_and_refusals_and_detects_tampering(
    cp: ControlPlane, publisher: Publisher
) -> None:
    reader = await make_token(cp, ["fleet:read"])
    await cp.push(iris_bundle(publisher.key))
    await cp.call("POST", "/rollouts", token=reader["token"], json={"model": "iris"})  # 403
    await cp.call("GET", "/fleet", token="mfa_forged")  # 401
    agent = await cp.enroll({"site": "a"})
    await cp.call(
        "POST",
        f"/agents/{agent['agentId']}/status",
        token=agent["credential"],
        json={
            "agentId": agent["agentId"],
            "generation": 0,
            "sentAt": "2026-01-01T00:00:00Z",
            "models": [],
        },
    )
    events = (await (await cp.call("GET", "/audit")).json())["events"]
    actions = [(e["action"], e["outcome"]) for e in events]
    assert ("POST /api/v1/tokens", 201) in actions
    assert ("POST /api/v1/bundles", 201) in actions
    assert ("POST /api/v1/rollouts", 403) in actions
    assert ("GET /api/v1/fleet", 401) in actions
    assert ("POST /api/v1/agents/enroll", 201) in actions
    assert not any("/status" in a for a, _ in actions)  # routine reports are not changes
    refused = next(e for e in events if e["outcome"] == 403)
    assert refused["actor"] == f"token:{reader['id']}:fleet:read"
    assert refused["remote"] == "127.0.0.1" and refused["at"].endswith("Z")
    cli = ["--server", cp.url, "--token", cp.token]
    p = await run_cli("audit", "verify", *cli)
    assert p.returncode == 0 and "intact" in p.stdout, p.stderr
    head = p.stdout.split("head ")[1].strip()

    db = cp.client.app[STATE].db
    # Edit a row: detected at that row.
    async with db.write() as s:
        await s.execute(
            text("UPDATE audit_events SET outcome = 200 WHERE id = :i"), {"i": refused["id"]}
        )
    p = await run_cli("audit", "verify", *cli)
    assert p.returncode == 1 and f"event {refused['id']} was changed" in p.stderr
    async with db.write() as s:
        await s.execute(
            text("UPDATE audit_events SET outcome = 403 WHERE id = :i"), {"i": refused["id"]}
        )
    assert (await run_cli("audit", "verify", *cli)).returncode == 0
    # Delete a row in the middle: the next one no longer follows.
    async with db.write() as s:
        await s.execute(text("DELETE FROM audit_events WHERE id = :i"), {"i": events[1]["id"]})
    p = await run_cli("audit", "verify", *cli)
    assert p.returncode == 1 and f"event {events[2]['id']} does not follow" in p.stderr
    # Deleting the newest rows is caught by a head recorded earlier.
    async with db.write() as s:
        await s.execute(text("DELETE FROM audit_events WHERE id >= :i"), {"i": events[1]["id"]})
    p = await run_cli("audit", "verify", "--expect-head", head, *cli)
    assert p.returncode == 1 and "expected head" in p.stderr


async def test_token_cli(cp: ControlPlane) -> None:
    cli = ["--server", cp.url, "--token", cp.token]
    p = await run_cli("token", "create", "--name", "ci", "--scope", "models:write", *cli)
    assert p.returncode == 0 and p.stdout.startswith("mfa_"), p.stderr
    p = await run_cli("token", "list", *cli)
    assert "ci" in p.stdout and "models:write" in p.stdout
    p = await run_cli("token", "create", "--name", "x", "--scope", "root", *cli)
    assert p.returncode == 2 and "invalid choice" in p.stderr
    p = await run_cli("token", "revoke", "424242", *cli)
    assert p.returncode == 1 and "404" in p.stderr


async def test_rate_limit_answers_429_with_retry_after(
    tmp_path: Path, publisher: Publisher
) -> None:
    config = dataclasses.replace(
        cp_config(tmp_path, f"sqlite:///{tmp_path / 'cp.db'}", publisher),
        rate_limit_per_s=1.0,
        rate_limit_burst=3.0,
    )
    cp = await start_control_plane(config)
    try:
        other = await make_token(cp, ["fleet:read"])  # the admin's 1st request
        codes = [(await cp.call("GET", "/fleet")).status for _ in range(4)]
        assert codes[:2] == [200, 200] and codes[-1] == 429, codes
        r = await cp.call("GET", "/fleet")
        assert r.status == 429 and int(r.headers["Retry-After"]) >= 1
        assert (await r.json())["error"]["code"] == "rate_limited"
        # Another token has its own bucket; the refusal is audited.
        assert (await cp.call("GET", "/fleet", token=other["token"])).status == 200
        await asyncio.sleep(1.1)
        assert (await cp.call("GET", "/fleet")).status == 200  # a token came back
        await asyncio.sleep(1.1)
        events = (await (await cp.call("GET", "/audit")).json())["events"]
        assert any(e["outcome"] == 429 for e in events)
    finally:
        await cp.client.close()


def test_rate_limiter_buckets() -> None:
    now = [0.0]
    rl = RateLimiter(2.0, 4.0, clock=lambda: now[0])
    assert [rl.take("a") for _ in range(4)] == [0.0] * 4
    assert rl.take("a") == 0.5  # one token back in half a second
    assert rl.take("b") == 0.0
    now[0] += 0.5
    assert rl.take("a") == 0.0
    assert RateLimiter.retry_after(0.2) == "1" and RateLimiter.retry_after(2.1) == "3"
    now[0] += 100  # idle buckets are swept
    rl.take("c")
    assert set(rl._buckets) == {"c"}
