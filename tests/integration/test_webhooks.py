"""Webhooks against a real receiver: signed deliveries, retries counted, a receiver that fails,
hangs, answers 500 or 410, the events each change emits, REST and CLI, and two replicas."""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from control_plane.config import ServerConfig
from control_plane.db.engine import Database
from control_plane.events.outbox import emit
from protocol.reports import ModelStatus, StatusReport
from tests.support.agents import eventually
from tests.support.bundles import Publisher, iris_bundle, make_publisher
from tests.support.control_plane import (
    ControlPlane,
    assert_error,
    cp_config,
    start_control_plane,
)
from tests.support.fleet import run_cli
from tests.support.receiver import Behaviour, Receiver

pytestmark = pytest.mark.slow


def hooked(config: ServerConfig) -> ServerConfig:
    """Loopback receivers allowed, quick retries, agents offline after 1.5 s."""
    return dataclasses.replace(
        config,
        webhook_allow_private=True,
        # Long enough that a loaded machine's slow answer is not taken for a hang (an extra
        # attempt would throw the counts off), short enough for the hanging receiver.
        webhook_timeout_s=2.5,
        webhook_max_attempts=3,
        webhook_retry_base_s=0.2,
        offline_after_s=1.5,
        controller_interval_s=0.2,
    )


@pytest.fixture
async def hcp(tmp_path: Path, db_url: str, publisher: Publisher) -> AsyncIterator[ControlPlane]:
    plane = await start_control_plane(hooked(cp_config(tmp_path, db_url, publisher)))
    try:
        yield plane
    finally:
        await plane.client.close()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with Receiver() as r:
        yield r


async def subscribe(
    cp: ControlPlane, receiver: Receiver, path: str, events: list[str], behaviour: Behaviour
) -> str:
    """Create an endpoint for ``path`` and tell the receiver its secret; returns its id."""
    r = await cp.call("POST", "/webhooks", json={"url": receiver.url + path, "events": events})
    assert r.status == 201, await r.text()
    body = await r.json()
    assert body["secret"].startswith("mfw_") and body["events"] == events
    receiver.behaviours[path] = behaviour
    receiver.secrets[path] = body["secret"]
    return body["id"]


async def deliveries(cp: ControlPlane, endpoint_id: str, **query: str) -> list[dict[str, Any]]:
    r = await cp.call("GET", f"/webhooks/{endpoint_id}/deliveries", params=query)
    assert r.status == 200, await r.text()
    return (await r.json())["deliveries"]


async def test_rollout_events_are_signed_and_retried_until_delivered_or_given_up(
    hcp: ControlPlane, receiver: Receiver, publisher: Publisher
) -> None:
    ids = {
        "/ok": await subscribe(hcp, receiver, "/ok", ["*"], Behaviour()),
        "/flaky": await subscribe(
            hcp, receiver, "/flaky", ["rollout.created"], Behaviour(fail_first=2)
        ),
        "/slow": await subscribe(
            hcp, receiver, "/slow", ["rollout.created"], Behaviour(fail_first=1, hang_s=6.0)
        ),
        "/down": await subscribe(hcp, receiver, "/down", ["rollout.created"], Behaviour(500)),
        "/gone": await subscribe(hcp, receiver, "/gone", ["rollout.created"], Behaviour(410)),
    }
    assert (await hcp.push(iris_bundle(publisher.key))).status == 201
    rollout = await hcp.rollout()

    async def settled() -> bool:
        states = [d["state"] for i in ids.values() for d in await deliveries(hcp, i)]
        return "pending" not in states and len(states) >= 5

    await eventually(settled, within_s=30)
    # Every POST that arrived was signed with its endpoint's secret over the raw body.
    assert receiver.received and all(r.signed for r in receiver.received)

    ok = [r for r in receiver.received if r.path == "/ok"]
    created = [r.event for r in ok if r.event["type"] == "rollout.created"]
    assert len(created) == 1
    event = created[0]
    assert set(event) == {"id", "type", "subject", "time", "data"}
    assert event["subject"] == f"rollout/{rollout['id']}"
    assert event["data"]["rolloutId"] == rollout["id"] and "iris 1.0.0" in event["data"]["reason"]

    def only(path: str) -> dict[str, Any]:
        found = [r for r in receiver.received if r.path == path]
        assert {r.event["id"] for r in found} == {event["id"]}, path
        return {"attempts": len(found)}

    flaky = (await deliveries(hcp, ids["/flaky"]))[0]
    assert only("/flaky") == {"attempts": 3}
    assert (flaky["state"], flaky["attempts"]) == ("delivered", 3)
    assert [e["status"] for e in flaky["log"]] == [500, 500, 200]

    slow = (await deliveries(hcp, ids["/slow"]))[0]
    assert only("/slow") == {"attempts": 2}
    assert (slow["state"], slow["attempts"]) == ("delivered", 2)
    assert slow["log"][0]["status"] is None and "no answer within 2.5s" in slow["log"][0]["error"]

    down = (await deliveries(hcp, ids["/down"]))[0]
    assert only("/down") == {"attempts": 3}  # max attempts, then given up
    assert (down["state"], down["lastStatus"], down["lastError"]) == ("failed", 500, "HTTP 500")

    gone = (await deliveries(hcp, ids["/gone"]))[0]
    assert only("/gone") == {"attempts": 1}  # 410: gone for good, no retry
    assert (gone["state"], gone["lastStatus"]) == ("failed", 410)

    listed = await (await hcp.call("GET", "/webhooks")).json()
    by_id = {w["id"]: w for w in listed["webhooks"]}
    assert by_id[ids["/down"]]["deliveries"] == {"failed": 1}
    assert all("secret" not in w for w in listed["webhooks"])
    failed = await deliveries(hcp, ids["/down"], state="failed")
    assert [d["id"] for d in failed] == [down["id"]]
    assert await deliveries(hcp, ids["/down"], state="delivered") == []


async def test_failed_activation_once_per_failure_and_agent_offline(
    hcp: ControlPlane, receiver: Receiver
) -> None:
    await subscribe(hcp, receiver, "/ops", ["activation.failed", "agent.offline"], Behaviour())
    agent = await hcp.enroll({"site": "a"}, name="box-1")
    agent_id, credential = agent["agentId"], agent["credential"]
    failed = ModelStatus("iris", "2.0.0", "sha256:" + "d" * 64, "failed", "smoke test failed")
    for seq in (1, 2, 3):  # the same failure, reported again by heartbeats
        doc = StatusReport(agent_id, 4, datetime.now(UTC), (failed,), epoch=1, seq=seq).to_json()
        r = await hcp.call("POST", f"/agents/{agent_id}/status", token=credential, json=doc)
        assert r.status == 200, await r.text()

    def types() -> Counter[str]:
        return Counter(r.event["type"] for r in receiver.received)

    await eventually(lambda: types()["agent.offline"] == 1, within_s=20)
    await asyncio.sleep(1.5)  # nothing more comes: each fact is announced once
    assert types() == Counter({"activation.failed": 1, "agent.offline": 1})
    by_type = {r.event["type"]: r.event for r in receiver.received}
    assert all(r.signed for r in receiver.received)
    assert by_type["activation.failed"]["data"] == {
        "agentId": agent_id,
        "model": "iris",
        "version": "2.0.0",
        "manifestDigest": failed.manifest_digest,
        "state": "failed",
        "reason": "smoke test failed",
        "generation": 4,
    }
    offline = by_type["agent.offline"]["data"]
    assert offline["agentId"] == agent_id and offline["name"] == "box-1"


async def test_bad_endpoints_are_refused_and_nothing_is_stored(
    cp: ControlPlane, receiver: Receiver
) -> None:
    good = {"url": "https://hooks.example.com/in", "events": ["rollout.*"]}
    cases = [
        ({**good, "url": "ftp://example.com/x"}, "url"),
        ({**good, "url": "http://169.254.169.254/latest"}, "url"),
        ({**good, "url": receiver.url + "/x"}, "url"),  # loopback: not allowed by default
        ({**good, "url": "https://u:p@example.com/"}, "url"),
        ({**good, "events": []}, "events"),
        ({**good, "events": ["nosuch.*"]}, "events"),
        ({**good, "description": 5}, "description"),
    ]
    for body, field in cases:
        await assert_error(await cp.call("POST", "/webhooks", json=body), 400, field=field)
    assert (await (await cp.call("GET", "/webhooks")).json())["webhooks"] == []

    r = await cp.call("POST", "/tokens", json={"name": "ro", "scopes": ["fleet:read"]})
    reader = (await r.json())["token"]
    await assert_error(
        await cp.call("POST", "/webhooks", token=reader, json=good), 403, "insufficient_scope"
    )
    await assert_error(await cp.call("GET", "/webhooks", token=reader), 403)

    r = await cp.call("POST", "/webhooks", json=good)
    assert r.status == 201
    endpoint_id = (await r.json())["id"]
    await assert_error(
        await cp.call("GET", f"/webhooks/{endpoint_id}/deliveries", params={"state": "x"}),
        400,
        field="state",
    )
    assert (await cp.call("DELETE", f"/webhooks/{endpoint_id}")).status == 200
    await assert_error(await cp.call("DELETE", f"/webhooks/{endpoint_id}"), 404)
    await assert_error(await cp.call("GET", f"/webhooks/{endpoint_id}/deliveries"), 404)


async def test_key_set_change_is_announced(
    tmp_path: Path, publisher: Publisher, receiver: Receiver
) -> None:
    keys = tmp_path / "keys"
    root, p2, cp_key = (make_publisher(keys, n) for n in ("root", "p2", "cp"))
    ks_file = tmp_path / "keyset.json"
    p = await run_cli(
        "keys",
        "rotate",
        "--init",
        "--root-key",
        root.key_path,
        "--add-publisher",
        publisher.pub_path,
        "--add-control-plane",
        cp_key.key_path,
        "--out",
        ks_file,
    )
    assert p.returncode == 0, p.stderr
    config = dataclasses.replace(
        hooked(cp_config(tmp_path, f"sqlite:///{tmp_path / 'cp.db'}", publisher)),
        keyset_file=ks_file,
        signing_key_file=cp_key.key_path,
    )
    cp = await start_control_plane(config)
    try:
        await subscribe(cp, receiver, "/keys", ["keyset.*"], Behaviour())
        p = await run_cli(
            "keys",
            "rotate",
            "--root-key",
            root.key_path,
            "--add-publisher",
            p2.pub_path,
            "--server",
            cp.url,
            "--token",
            cp.token,
        )
        assert p.returncode == 0, p.stderr

        # Version 1 was installed at start: whether it reaches the endpoint depends on whether
        # the first delivery pass fanned it out before the endpoint existed. Version 2 must.
        def second() -> list:
            return [r for r in receiver.received if r.event["data"]["version"] == 2]

        await eventually(second, within_s=15)
        await asyncio.sleep(1.0)
        [got] = second()
        assert got.signed and got.event["type"] == "keyset.changed"
        assert all(r.event["type"] == "keyset.changed" for r in receiver.received)
        assert len(got.event["data"]["roles"]["publishers"]) == 2
    finally:
        await cp.client.close()


async def test_cli_creates_lists_shows_deliveries_and_deletes(
    tmp_path: Path, publisher: Publisher, receiver: Receiver
) -> None:
    cp = await start_control_plane(
        hooked(cp_config(tmp_path, f"sqlite:///{tmp_path / 'cp.db'}", publisher))
    )
    cli = ("--server", cp.url, "--token", cp.token)
    try:
        p = await run_cli(
            "webhook", "create", "--url", receiver.url + "/cli", "--event", "rollout.*", *cli
        )
        assert p.returncode == 0, p.stderr
        lines = dict(line.split(": ", 1) for line in p.stdout.splitlines() if ": " in line)
        endpoint_id, secret = lines["id"], lines["secret"]
        assert secret.startswith("mfw_")
        receiver.behaviours["/cli"] = Behaviour()
        receiver.secrets["/cli"] = secret
        assert (await cp.push(iris_bundle(publisher.key))).status == 201
        await cp.rollout()
        await eventually(lambda: len(receiver.received) >= 2, within_s=15)
        assert all(r.signed for r in receiver.received)

        p = await run_cli("webhook", "list", *cli)
        assert p.returncode == 0 and endpoint_id in p.stdout and "rollout.*" in p.stdout
        p = await run_cli("webhook", "deliveries", endpoint_id, "--state", "delivered", *cli)
        assert p.returncode == 0 and "rollout.created" in p.stdout and "delivered" in p.stdout
        p = await run_cli("webhook", "create", "--url", "ftp://x", "--event", "*", *cli)
        assert p.returncode == 1 and "(field: url)" in p.stderr
        p = await run_cli("webhook", "delete", endpoint_id, *cli)
        assert p.returncode == 0 and f"deleted {endpoint_id}" in p.stdout
    finally:
        await cp.client.close()


async def test_two_replicas_deliver_each_event_once(
    tmp_path: Path, pg_url: str, publisher: Publisher, receiver: Receiver
) -> None:
    # Two replicas of one control plane: one database, one data directory (signing key).
    a = await start_control_plane(hooked(cp_config(tmp_path, pg_url, publisher)))
    b = await start_control_plane(hooked(cp_config(tmp_path, pg_url, publisher)))
    try:
        await subscribe(a, receiver, "/once", ["webhook.test"], Behaviour())
        db = Database(pg_url)
        try:
            for batch in range(4):
                async with db.write() as s:
                    for i in range(15):
                        emit(s, "webhook.test", f"test/{batch}/{i}", {"i": i}, datetime.now(UTC))
                await asyncio.sleep(0.3)
        finally:
            await db.close()
        await eventually(lambda: len(receiver.received) >= 60, within_s=30)
        await asyncio.sleep(2)  # a second delivery of anything would arrive by now
        ids = Counter(r.event["id"] for r in receiver.received)
        assert len(ids) == 60 and set(ids.values()) == {1}
        assert all(r.signed for r in receiver.received)
    finally:
        await a.client.close()
        await b.client.close()
