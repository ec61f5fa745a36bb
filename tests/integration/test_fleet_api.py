"""Enrollment, credentials, desired state, blobs and reports against a real control plane."""

from __future__ import annotations

import asyncio
import hashlib
import time
from datetime import UTC, datetime, timedelta

from protocol.desired import accept_desired
from protocol.dsse import keyring, load_public_key
from protocol.reports import MetricsBatch, ModelStatus, SeriesWindow, StatusReport
from tests.support.bundles import Publisher, iris_bundle
from tests.support.control_plane import ControlPlane, assert_error


async def agent_count(cp: ControlPlane) -> int:
    return len((await (await cp.call("GET", "/agents")).json())["agents"])


async def test_enroll_gives_credential_keys_and_labels(cp: ControlPlane) -> None:
    r = await cp.call("POST", "/enrollment-tokens", json={"labels": {"site": "onprem"}})
    token = (await r.json())["token"]
    r = await cp.call(
        "POST",
        "/agents/enroll",
        token="",
        json={
            "token": token,
            "labels": {"hw": "cpu", "site": "cloud"},
            "name": "box1",
            "facts": {"cpuCount": 2},
        },
    )
    assert r.status == 201, await r.text()
    out = await r.json()
    # The token's labels win over what the agent asked for.
    assert out["labels"] == {"hw": "cpu", "site": "onprem"}
    assert out["credential"].startswith("mfc_")
    assert "BEGIN PUBLIC KEY" in out["controlPlaneKey"] and len(out["trustedPublishers"]) == 1
    r = await cp.call("GET", f"/agents/{out['agentId']}")
    agent = await r.json()
    assert agent["name"] == "box1" and agent["facts"] == {"cpuCount": 2}


async def test_enrollment_token_used_up_and_expired(cp: ControlPlane) -> None:
    r = await cp.call("POST", "/enrollment-tokens", json={"maxUses": 1})
    token = (await r.json())["token"]
    assert (await cp.call("POST", "/agents/enroll", token="", json={"token": token})).status == 201
    r = await cp.call("POST", "/agents/enroll", token="", json={"token": token})
    await assert_error(r, 403, "enrollment_token_used_up", "token")

    r = await cp.call("POST", "/enrollment-tokens", json={"ttlSeconds": 1})
    token = (await r.json())["token"]
    await asyncio.sleep(1.1)
    r = await cp.call("POST", "/agents/enroll", token="", json={"token": token})
    await assert_error(r, 403, "enrollment_token_expired", "token")
    r = await cp.call("POST", "/agents/enroll", token="", json={"token": "mfe_nope"})
    await assert_error(r, 401, "invalid_enrollment_token", "token")
    assert await agent_count(cp) == 1


async def test_bad_enrollment_bodies(cp: ControlPlane) -> None:
    await assert_error(await cp.call("POST", "/agents/enroll", token="", data=b"{not json"), 400)
    await assert_error(await cp.call("POST", "/agents/enroll", token="", json=[]), 400)
    await assert_error(
        await cp.call("POST", "/agents/enroll", token="", json={"token": 5}), 400, field="token"
    )
    r = await cp.call("POST", "/enrollment-tokens", json={"labels": {"bad key!": "x"}})
    await assert_error(r, 400, field="labels")
    r = await cp.call("POST", "/enrollment-tokens", json={"maxUses": 0})
    await assert_error(r, 400, field="maxUses")
    r = await cp.call("POST", "/enrollment-tokens", data=b"x" * (2 * 1024 * 1024))
    await assert_error(r, 413)
    assert await agent_count(cp) == 0


async def test_agent_credential_reaches_only_its_own_routes(cp: ControlPlane) -> None:
    a, b = await cp.enroll(), await cp.enroll()
    cred = a["credential"]
    await assert_error(await cp.call("GET", f"/agents/{b['agentId']}", token=cred), 403)
    await assert_error(await cp.call("GET", f"/agents/{b['agentId']}/desired", token=cred), 403)
    report = StatusReport(b["agentId"], 0, datetime.now(UTC), ()).to_json()
    r = await cp.call("POST", f"/agents/{b['agentId']}/status", token=cred, json=report)
    await assert_error(r, 403)
    await assert_error(await cp.call("GET", "/agents", token=cred), 403)
    await assert_error(await cp.call("GET", "/models", token=cred), 403)
    r = await cp.call("POST", "/rollouts", token=cred, json={"model": "iris", "version": "1"})
    await assert_error(r, 403)
    assert (await cp.call("GET", f"/agents/{a['agentId']}", token=cred)).status == 200
    # b's record is untouched.
    b_now = await (await cp.call("GET", f"/agents/{b['agentId']}")).json()
    assert b_now["models"] == [] and b_now["reportedGeneration"] == 0


async def test_rollout_writes_signed_desired_state_and_wakes_long_poll(
    cp: ControlPlane, publisher: Publisher
) -> None:
    pushed = await (await cp.push(iris_bundle(publisher.key))).json()
    onprem = await cp.enroll({"site": "onprem"})
    cloud = await cp.enroll({"site": "cloud"})
    cred = onprem["credential"]
    path = f"/agents/{onprem['agentId']}/desired"
    r = await cp.call("GET", path + "?after=0&wait=0", token=cred)
    assert r.status == 204

    async def create_later() -> None:
        await asyncio.sleep(0.3)
        await cp.rollout(selector="site=onprem")

    t0 = time.monotonic()
    task = asyncio.create_task(create_later())
    r = await cp.call("GET", path + "?after=0&wait=10", token=cred)
    await task
    assert r.status == 200 and time.monotonic() - t0 < 5
    assert r.headers["X-Modelfleet-Generation"] == "1"
    keys = keyring([load_public_key(onprem["controlPlaneKey"].encode())])
    ds = accept_desired(await r.read(), keys, onprem["agentId"], 0, datetime.now(UTC))
    assert ds is not None and ds.generation == 1
    assert [(m.name, m.version, m.manifest_digest) for m in ds.models] == [
        ("iris", "1.0.0", pushed["manifestDigest"])
    ]
    assert (ds.expires_at - ds.issued_at) == timedelta(days=7)
    # The cloud agent is not targeted.
    r = await cp.call(
        "GET", f"/agents/{cloud['agentId']}/desired?wait=0", token=cloud["credential"]
    )
    assert r.status == 204
    # An agent enrolling later that matches gets it at once.
    late = await cp.enroll({"site": "onprem"})
    r = await cp.call("GET", f"/agents/{late['agentId']}/desired", token=late["credential"])
    assert r.status == 200


async def test_rollout_errors(cp: ControlPlane, publisher: Publisher) -> None:
    r = await cp.call("POST", "/rollouts", json={"model": "iris", "version": "1.0.0"})
    await assert_error(r, 404, "version_not_found", "version")
    await cp.push(iris_bundle(publisher.key))
    for body, field in [
        ({"version": "1.0.0"}, "model"),
        ({"model": "iris", "version": "1.0.0", "selector": "site in ()"}, "selector"),
        ({"model": "iris", "version": "1.0.0", "selector": "a b"}, "selector"),
        ({"model": "iris", "version": "1.0.0", "selector": 5}, "selector"),
        ({"model": "iris", "version": "1.0.0", "stages": [{"percent": 5}]}, "stages"),
    ]:
        await assert_error(await cp.call("POST", "/rollouts", json=body), 400, field=field)
    await assert_error(await cp.call("GET", "/rollouts/nope"), 404)


async def test_blob_range_etag_and_length(cp: ControlPlane, publisher: Publisher) -> None:
    await cp.push(iris_bundle(publisher.key))
    versions = await (await cp.call("GET", "/models/iris/versions")).json()
    env = await (
        await cp.call("GET", f"/manifests/{versions['versions'][0]['manifestDigest']}")
    ).read()
    assert b"payloadType" in env
    blob = next(p for p in (cp.config.blob_dir / "sha256").rglob("*") if p.is_file())
    data = blob.read_bytes()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    r = await cp.call("GET", f"/blobs/{digest}")
    assert r.status == 200 and await r.read() == data
    assert r.headers["ETag"] == f'"{digest}"' and int(r.headers["Content-Length"]) == len(data)
    r = await cp.call("GET", f"/blobs/{digest}", headers={"Range": "bytes=10-"})
    assert r.status == 206 and await r.read() == data[10:]
    assert r.headers["Content-Range"] == f"bytes 10-{len(data) - 1}/{len(data)}"
    r = await cp.call("GET", f"/blobs/{digest}", headers={"Range": "bytes=0-9"})
    assert r.status == 206 and await r.read() == data[:10]
    r = await cp.call("GET", f"/blobs/{digest}", headers={"Range": "bytes=-5"})
    assert await r.read() == data[-5:]
    r = await cp.call("GET", f"/blobs/{digest}", headers={"Range": f"bytes={len(data)}-"})
    assert r.status == 416 and r.headers["Content-Range"] == f"bytes */{len(data)}"
    r = await cp.call("GET", f"/blobs/{digest}", headers={"If-None-Match": f'"{digest}"'})
    assert r.status == 304
    # If-Range with another validator: the whole blob, not a slice of something else.
    r = await cp.call(
        "GET", f"/blobs/{digest}", headers={"Range": "bytes=10-", "If-Range": '"other"'}
    )
    assert r.status == 200 and await r.read() == data
    await assert_error(await cp.call("GET", "/blobs/sha256:" + "0" * 64), 404)
    await assert_error(await cp.call("GET", "/blobs/md5:abc"), 400, field="digest")


async def test_status_and_metrics_are_stored_once(cp: ControlPlane, publisher: Publisher) -> None:
    a = await cp.enroll({"site": "onprem"})
    aid, cred = a["agentId"], a["credential"]
    now = datetime.now(UTC)
    status = StatusReport(
        aid, 1, now, (ModelStatus("iris", "1.0.0", "sha256:" + "c" * 64, "active"),), {"c": 2}
    )
    r = await cp.call("POST", f"/agents/{aid}/status", token=cred, json=status.to_json())
    assert r.status == 200, await r.text()
    agent = await (await cp.call("GET", f"/agents/{aid}")).json()
    assert agent["models"][0]["state"] == "active" and agent["online"]

    s = SeriesWindow("iris", "1.0.0", requests=3, errors=1)
    for v in (1.0, 2.0, 3.0):
        s.latency_ms.add(v)
    batch = MetricsBatch(aid, 1, now, now, (s,)).to_json()
    r1 = await cp.call("POST", f"/agents/{aid}/metrics", token=cred, json=batch)
    r2 = await cp.call("POST", f"/agents/{aid}/metrics", token=cred, json=batch)
    assert (await r1.json())["stored"] is True
    assert (await r2.json()) == {"stored": False, "duplicate": True, "seq": 1}

    from sqlalchemy import func, select

    from control_plane.db.engine import Database
    from control_plane.db.models import MetricSeries

    db = Database(cp.config.database_url)
    async with db.read() as sess:
        total = await sess.scalar(select(func.sum(MetricSeries.requests)))
    await db.close()
    assert total == 3

    bad = dict(batch, seq=2, agentId="someone-else")
    r = await cp.call("POST", f"/agents/{aid}/metrics", token=cred, json=bad)
    await assert_error(r, 400, field="agentId")
    bad = dict(batch, seq=-4)
    await assert_error(
        await cp.call("POST", f"/agents/{aid}/metrics", token=cred, json=bad), 400, field="seq"
    )
    bad_status = dict(status.to_json(), models=[{"name": "iris"}])
    r = await cp.call("POST", f"/agents/{aid}/status", token=cred, json=bad_status)
    await assert_error(r, 400, field="models[0].state")
    agent = await (await cp.call("GET", f"/agents/{aid}")).json()
    assert agent["models"][0]["state"] == "active"


async def test_openapi_lists_every_route(cp: ControlPlane) -> None:
    doc = await (await cp.call("GET", "/openapi.json", token="")).json()
    assert doc["openapi"].startswith("3.1")
    app = cp.client.server.app
    assert app is not None
    registered = {
        (r.method.lower(), r.resource.canonical)  # type: ignore[union-attr]
        for r in app.router.routes()
        if r.method != "HEAD" and r.resource.canonical.startswith("/api/")  # type: ignore[union-attr]
    }
    documented = {(m, p) for p, ops in doc["paths"].items() for m in ops}
    assert registered == documented
    assert {"/api/v1/bundles", "/api/v1/agents/{id}/desired"} <= set(doc["paths"])


async def test_unknown_route_is_json(cp: ControlPlane) -> None:
    await assert_error(await cp.call("GET", "/nope"), 404)


def test_rest_reference_is_current() -> None:
    from pathlib import Path

    from control_plane.api.openapi import build_openapi, to_markdown
    from control_plane.api.routes import ROUTES

    committed = Path(__file__).resolve().parents[2] / "docs" / "rest.md"
    assert committed.read_text() == to_markdown(build_openapi(ROUTES)), (
        "docs/rest.md is stale: run python docs/gen_rest.py"
    )
