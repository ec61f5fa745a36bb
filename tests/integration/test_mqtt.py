"""MQTT transport against real mosquitto processes this test starts, with generated
credentials and ACLs; every test uses a topic prefix of its own."""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiomqtt
import pytest

from agent.host.install import InstallOptions, install
from bench.devkit.models import iris_model
from control_plane.mqtt.broker_auth import CONTROL_PLANE_USER
from control_plane.state import MQTT
from protocol.desired import DesiredModel, DesiredState
from protocol.dsse import generate_private_key
from protocol.topics import agent_topic
from tests.support.agents import Load, enroll_agent, eventually, resolves_to, running_agent, serving
from tests.support.broker import CP_PASSWORD, Broker, mqtt_config
from tests.support.bundles import Publisher, iris_bundle
from tests.support.control_plane import ControlPlane, start_control_plane, stored_requests
from tests.support.fleet import MODELFLEET, free_port

pytestmark = pytest.mark.slow


@pytest.fixture
async def mcp(tmp_path: Path, publisher: Publisher, broker: Broker) -> AsyncIterator[ControlPlane]:
    config = mqtt_config(tmp_path, publisher, broker)
    plane = await start_control_plane(config)
    try:
        yield plane
    finally:
        await plane.client.close()


async def test_pushed_over_mqtt_reports_over_mqtt_and_forgeries_refused(
    mcp: ControlPlane, broker: Broker, publisher: Publisher, tmp_path: Path
) -> None:
    cp = mcp
    await cp.push(iris_bundle(publisher.key, "1.0.0"))
    await cp.push(iris_bundle(publisher.key, "2.0.0", seed=1))
    ident = await enroll_agent(cp, tmp_path / "a", {"site": "x"})
    assert ident.mqtt is not None and ident.mqtt["username"] == ident.agent_id
    await broker.load_passwords(cp)
    bridge = cp.client.server.app[MQTT]  # type: ignore[union-attr]
    async with running_agent(tmp_path / "a", poll_interval_s=3600) as agent:
        assert agent.mqtt is not None
        await eventually(lambda: agent.mqtt is not None and agent.mqtt.connected, 10)
        for version in ("1.0.0", "2.0.0"):
            before = agent.state.highest_generation
            await cp.rollout(version, "site=x")
            await eventually(lambda b=before: agent.state.highest_generation > b, 15)
            # Pushed, not polled: the agent's HTTP poll checks only hourly while MQTT is up
            # (a long-poll begun before the link came up may still answer the first one).
            if version == "2.0.0":
                assert agent.sync.adopted_via == "mqtt"
        await eventually(lambda: bridge.stored["status"] > 0, 10)

        # Someone with broker access (here: the control plane's broker account) but not the
        # control plane's key: a forged document, then a replay of a genuine older one.
        now = datetime.now(UTC)
        forged = (
            DesiredState(
                ident.agent_id,
                99,
                now,
                now + timedelta(days=1),
                (DesiredModel("iris", "6.6.6", "sha256:" + "6" * 64),),
            )
            .sign(generate_private_key())
            .to_bytes()
        )
        async with broker.client(CONTROL_PLANE_USER, CP_PASSWORD) as c:
            await c.publish(agent_topic(ident.agent_id, "desired", broker.prefix), forged, qos=1)
        await eventually(lambda: "signature" in (agent.last_error or ""), 5)
        assert agent.state.highest_generation == 2
        old = json.loads((tmp_path / "a" / "state.json").read_text())["desired_envelope"]
        assert '"generation":2' in _payload(old)
        genuine_gen1 = await _genuine(cp, ident.agent_id, 1)
        async with broker.client(CONTROL_PLANE_USER, CP_PASSWORD) as c:
            await c.publish(
                agent_topic(ident.agent_id, "desired", broker.prefix), genuine_gen1, qos=1
            )
        await eventually(lambda: "older" in (agent.last_error or ""), 5)
        await eventually(lambda: serving(agent, "iris", "2.0.0"), 10)


def _payload(envelope: str) -> str:
    import base64

    return base64.b64decode(json.loads(envelope)["payload"]).decode()


async def _genuine(cp: ControlPlane, agent_id: str, generation: int) -> bytes:
    """A genuine older document, re-signed exactly as the control plane signed it then."""
    from control_plane.security.keys import load_or_create_signing_key

    key = load_or_create_signing_key(cp.config.data_dir / "control-plane.key")
    now = datetime.now(UTC)
    return DesiredState(agent_id, generation, now, now + timedelta(days=1), ()).sign(key).to_bytes()


async def test_acl_keeps_each_agent_to_its_own_topics(
    mcp: ControlPlane, broker: Broker, tmp_path: Path
) -> None:
    cp = mcp
    r = await cp.call("POST", "/enrollment-tokens", json={"maxUses": 2})
    token = (await r.json())["token"]
    creds = []
    for _ in range(2):
        r = await cp.call("POST", "/agents/enroll", token="", json={"token": token})
        creds.append((await r.json())["mqtt"])
    a, b = creds
    await broker.load_passwords(cp)
    topic = lambda who, kind: agent_topic(who["username"], kind, broker.prefix)  # noqa: E731
    async with broker.client(CONTROL_PLANE_USER, CP_PASSWORD) as watcher:
        for kind in ("status", "desired"):
            await watcher.subscribe(topic(b, kind), qos=1)
            await watcher.subscribe(topic(a, kind), qos=1)
        seen: list[str] = []

        async def watch() -> None:
            async for m in watcher.messages:
                seen.append(str(m.topic))

        task = asyncio.create_task(watch())
        async with broker.client(a["username"], a["password"]) as agent_a:
            # Mosquitto grants the subscription but never delivers what the ACL forbids.
            await agent_a.subscribe(topic(b, "desired"), qos=1)
            await agent_a.subscribe(topic(a, "desired"), qos=1)
            received: list[str] = []

            async def listen() -> None:
                async for m in agent_a.messages:
                    received.append(str(m.topic))

            listener = asyncio.create_task(listen())
            await watcher.publish(topic(b, "desired"), b"for b only", qos=1)
            await watcher.publish(topic(a, "desired"), b"for a", qos=1)
            await agent_a.publish(topic(b, "status"), b'{"agentId": "x"}', qos=1)
            await agent_a.publish(topic(a, "desired"), b"forged", qos=1)
            await agent_a.publish(topic(a, "status"), b"{}", qos=1)  # allowed
            await asyncio.sleep(0.5)
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)
        assert received == [topic(a, "desired")], received  # never B's
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert topic(a, "status") in seen  # the allowed publish arrived ...
    assert topic(b, "status") not in seen  # ... A cannot write B's status ...
    assert seen.count(topic(a, "desired")) == 1  # ... nor desired state for itself
    # A wrong password is refused outright.
    with pytest.raises(aiomqtt.MqttError):
        async with broker.client(a["username"], "wrong"):
            pass


async def test_broker_down_up_down_falls_back_to_http_and_loses_nothing(
    tmp_path: Path, publisher: Publisher, broker: Broker
) -> None:
    broker.stop()  # the agent starts while the broker is down
    config = mqtt_config(tmp_path, publisher, broker)
    cp = await start_control_plane(config)
    try:
        await cp.push(iris_bundle(publisher.key, "1.0.0"))
        await cp.push(iris_bundle(publisher.key, "2.0.0", seed=1))
        ident = await enroll_agent(cp, tmp_path / "a", {"site": "x"})
        async with running_agent(tmp_path / "a", metrics_interval_s=0.2, poll_wait_s=1) as agent:
            await cp.rollout("1.0.0", "site=x")
            await eventually(lambda: "iris" in agent.models, 10)  # over HTTP
            assert agent.mqtt is not None and not agent.mqtt.connected
            async with Load(agent.serve_port) as load:  # type: ignore[arg-type]
                await broker.start()
                await broker.load_passwords(cp)
                await eventually(lambda: agent.mqtt.connected, 20)  # type: ignore[union-attr]
                await cp.rollout("2.0.0", "site=x")
                await eventually(lambda: serving(agent, "iris", "2.0.0"), 10)
                await asyncio.sleep(0.5)
                broker.stop()
                await eventually(lambda: not agent.mqtt.connected, 20)  # type: ignore[union-attr]
                await asyncio.sleep(0.5)
            assert load.failures == [] and load.transport_errors == 0
            served = load.ok
            # Batches in flight over MQTT when the broker went are sent again over HTTP.
            await eventually(lambda: agent.counters["pending_batches"] == 0, 15)
        await eventually(lambda: resolves_to(stored_requests(cp), served), 10)
        assert ident.agent_id
    finally:
        await cp.client.close()


async def test_control_plane_restart_loses_nothing_published_meanwhile(
    tmp_path: Path, publisher: Publisher, broker: Broker
) -> None:
    config = mqtt_config(tmp_path, publisher, broker)
    cp = await start_control_plane(config)
    port = cp.client.port
    await cp.push(iris_bundle(publisher.key, "1.0.0"))
    ident = await enroll_agent(cp, tmp_path / "a", {"site": "x"})
    await broker.load_passwords(cp)
    try:
        async with running_agent(
            tmp_path / "a", metrics_interval_s=0.2, poll_interval_s=3600, heartbeat_s=0.3
        ) as agent:
            await eventually(lambda: agent.mqtt.connected, 10)  # type: ignore[union-attr]
            await cp.rollout("1.0.0", "site=x")
            await eventually(lambda: "iris" in agent.models, 10)
            async with Load(agent.serve_port) as load:  # type: ignore[arg-type]
                await asyncio.sleep(0.5)
                await cp.client.close()  # the control plane is gone; the broker stays
                await asyncio.sleep(1.5)  # batches keep going to the broker meanwhile
                cp = await start_control_plane(config, port=port)
                await asyncio.sleep(0.5)
            served = load.ok
            # Every batch is let go on the control plane's own acknowledgement over MQTT.
            await eventually(lambda: agent.counters["pending_batches"] == 0, 15)
        await eventually(lambda: resolves_to(stored_requests(cp), served), 15)
        agents = (await (await cp.call("GET", "/agents")).json())["agents"]
        assert (
            agents[0]["id"] == ident.agent_id and agents[0]["state"] == "offline"
        )  # its presence said so
    finally:
        await cp.client.close()


@pytest.mark.parametrize("transport", ["mqtt", "auto"])
async def test_bundle_over_mqtt_with_no_http_route_and_a_broker_cut(
    mcp: ControlPlane, broker: Broker, publisher: Publisher, tmp_path: Path, transport: str
) -> None:
    cp = mcp
    big = iris_model(seed=0, pad_bytes=3_000_000)
    await cp.push(iris_bundle(publisher.key, "1.0.0", model=big, smoke_rows=1))
    ident = await enroll_agent(cp, tmp_path / "a", {"site": "x"})
    await broker.load_passwords(cp)
    # The agent's only route out is the broker: its control plane URL leads nowhere.
    identity = json.loads((tmp_path / "a/identity.json").read_text())
    identity["server"] = f"http://127.0.0.1:{free_port()}"
    (tmp_path / "a/identity.json").write_text(json.dumps(identity))
    async with running_agent(
        tmp_path / "a", bundle_transport=transport, poll_interval_s=3600, poll_wait_s=1
    ) as agent:
        await eventually(lambda: agent.mqtt.connected, 10)  # type: ignore[union-attr]
        await cp.rollout("1.0.0", "site=x")
        await eventually(lambda: agent.counters["download_bytes"] > 1_000_000, 30, 0.01)
        broker.stop()  # the broker goes away mid-blob ...
        await asyncio.sleep(0.5)
        await broker.start()  # ... and comes back
        await eventually(lambda: "iris" in agent.models, 60)
        received = agent.counters["download_bytes"]
    assert len(big) <= received < len(big) * 1.15  # resumed from disk, not started over
    bridge = cp.client.server.app[MQTT]  # type: ignore[union-attr]
    assert bridge.stored["blobs/request"] >= len(big) // (128 * 1024)
    assert ident.agent_id


async def test_malformed_payloads_are_dropped_and_counted(
    mcp: ControlPlane, broker: Broker, publisher: Publisher
) -> None:
    cp = mcp
    r = await cp.call("POST", "/enrollment-tokens", json={})
    token = (await r.json())["token"]
    out = await (await cp.call("POST", "/agents/enroll", token="", json={"token": token})).json()
    creds = out["mqtt"]
    await broker.load_passwords(cp)
    topic = lambda kind: agent_topic(creds["username"], kind, broker.prefix)  # noqa: E731
    now = datetime.now(UTC).isoformat()
    async with broker.client(creds["username"], creds["password"]) as c:
        for kind, payload in [
            ("status", b"not json"),
            ("status", b"[]"),
            (
                "status",
                json.dumps(
                    {"agentId": "someone-else", "generation": 0, "sentAt": now, "models": []}
                ).encode(),
            ),
            ("metrics", json.dumps({"agentId": creds["username"], "seq": 0}).encode()),
            ("presence", b"maybe"),
            ("blobs/request", b"{}"),
        ]:
            await c.publish(topic(kind), payload, qos=1)
        good = {"agentId": creds["username"], "generation": 0, "sentAt": now, "models": []}
        await c.publish(topic("status"), json.dumps(good).encode(), qos=1)

    async def counted() -> dict | None:
        h = await (await cp.call("GET", "/health", token="")).json()
        return h if h["mqtt"]["malformed"] == 6 and h["mqtt"]["stored"]["status"] == 1 else None

    health = await eventually(counted, 10)
    assert health["mqtt"]["connected"] is True
    agent = await (await cp.call("GET", f"/agents/{creds['username']}")).json()
    assert agent["lastSeen"] is not None  # the one good report was stored
    assert publisher


async def test_mqtts_with_a_custom_ca(tmp_path: Path, publisher: Publisher) -> None:
    broker = Broker(tmp_path / "tls-broker", f"test-{uuid.uuid4().hex[:8]}/v1", tls=True)
    await broker.start()
    ca = str(broker.root / "ca.pem")
    config = mqtt_config(tmp_path, publisher, broker, mqtt_ca_file=ca)
    cp = await start_control_plane(config)
    try:
        await cp.push(iris_bundle(publisher.key, "1.0.0"))
        await enroll_agent(cp, tmp_path / "a", {"site": "x"})
        await broker.load_passwords(cp)
        bridge = cp.client.server.app[MQTT]  # type: ignore[union-attr]
        await eventually(lambda: bridge.connected.is_set(), 15)
        # Without the CA the agent cannot verify the broker: it stays on HTTP.
        async with running_agent(tmp_path / "a", poll_interval_s=3600) as agent:
            await asyncio.sleep(1.5)
            assert agent.mqtt is not None and not agent.mqtt.connected
        async with running_agent(tmp_path / "a", poll_interval_s=3600, mqtt_ca_file=ca) as agent:
            await eventually(lambda: agent.mqtt.connected, 15)  # type: ignore[union-attr]
            before = agent.state.highest_generation
            await cp.rollout("1.0.0", "site=x")
            await eventually(lambda: agent.state.highest_generation > before, 5)
    finally:
        await cp.client.close()
        broker.stop()


async def test_fleet_simulator_over_mqtt(tmp_path: Path, publisher: Publisher) -> None:
    # Simulated agents enroll and connect at once: an open broker, as for benchmarks.
    broker = Broker(tmp_path / "open-broker", f"test-{uuid.uuid4().hex[:8]}/v1", anonymous=True)
    await broker.start()
    cp = await start_control_plane(mqtt_config(tmp_path, publisher, broker))
    try:
        await cp.push(iris_bundle(publisher.key, "1.0.0"))
        p = await asyncio.to_thread(
            subprocess.run,
            [
                MODELFLEET,
                "sim",
                "--server",
                cp.url,
                "--token",
                cp.token,
                "--agents",
                "20",
                "--transport",
                "mqtt",
                "--rollout",
                "iris:1.0.0",
                "--timeout",
                "60",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert p.returncode == 0, p.stdout + p.stderr
        out = json.loads(p.stdout.strip().splitlines()[-1])
        assert out["converged"] is True and out["transport"] == "mqtt" and out["active"] == 20
        bridge = cp.client.server.app[MQTT]  # type: ignore[union-attr]
        assert bridge.stored["status"] >= 20  # their reports came over MQTT
    finally:
        await cp.client.close()
        broker.stop()


async def test_broker_restarted_during_a_rollout_loses_no_desired_state_or_report(
    tmp_path: Path, publisher: Publisher, broker: Broker
) -> None:
    """The broker goes away while a rollout moves the agent, and comes back: the agent gets
    the new version (over HTTP meanwhile, then MQTT again), and every request served is
    stored exactly once."""
    config = mqtt_config(tmp_path, publisher, broker)
    cp = await start_control_plane(config)
    try:
        await cp.push(iris_bundle(publisher.key, "1.0.0"))
        await cp.push(iris_bundle(publisher.key, "2.0.0", seed=1))
        ident = await enroll_agent(cp, tmp_path / "a", {"site": "x"})
        await broker.load_passwords(cp)
        async with running_agent(
            tmp_path / "a",
            metrics_interval_s=0.2,
            poll_wait_s=1,
            heartbeat_s=0.3,
            metrics_ack_timeout_s=2.0,
        ) as agent:
            await eventually(lambda: agent.mqtt.connected, 10)  # type: ignore[union-attr]
            await cp.rollout("1.0.0", "site=x")
            await eventually(lambda: "iris" in agent.models, 10)
            async with Load(agent.serve_port) as load:  # type: ignore[arg-type]
                await asyncio.sleep(0.5)
                broker.stop()  # mid-flight: reports on their way, a rollout about to start
                await cp.rollout("2.0.0", "site=x")
                await eventually(lambda: serving(agent, "iris", "2.0.0"), 15)
                await broker.start()
                await broker.load_passwords(cp)
                await eventually(lambda: agent.mqtt.connected, 20)  # type: ignore[union-attr]
                await asyncio.sleep(0.5)
            assert load.failures == [] and load.transport_errors == 0
            served = load.ok
            # The agent lets a batch go only on the control plane's acknowledgement, and sends
            # what was unacknowledged again after the reconnect.
            try:
                await eventually(lambda: resolves_to(stored_requests(cp), served), 20)
            except AssertionError:
                h = await (await cp.call("GET", "/health")).json()
                raise AssertionError(
                    f"stored {await stored_requests(cp)} of {served}; agent pending "
                    f"{agent.counters['pending_batches']}, in flight {len(agent.outbox.in_flight)},"
                    f" dropped {agent.counters['dropped_batches']}; control plane {h}"
                ) from None
            await eventually(lambda: agent.counters["pending_batches"] == 0, 10)

            # Status reports have no end-to-end acknowledgement: one published while the
            # control plane's bridge was still reconnecting reached no subscriber. The
            # heartbeat repairs the picture once the bridge is back, and it never goes back.
            async def active() -> list[str]:
                a = await (await cp.call("GET", f"/agents/{ident.agent_id}")).json()
                return [m["version"] for m in a["models"] if m["state"] == "active"]

            await eventually(lambda: resolves_to(active(), ["2.0.0"]), 20)
        assert await active() == ["2.0.0"]
    finally:
        await cp.client.close()


async def test_revoked_agent_is_cut_off_on_mqtt(
    mcp: ControlPlane, broker: Broker, publisher: Publisher, tmp_path: Path
) -> None:
    """After revocation its reports are refused, its retained desired state is cleared, and a
    regenerated password file keeps it out of the broker."""
    cp = mcp
    await cp.push(iris_bundle(publisher.key, "1.0.0"))
    ident = await enroll_agent(cp, tmp_path / "a", {"site": "x"})
    assert ident.mqtt is not None
    await broker.load_passwords(cp)
    await cp.rollout("1.0.0", "site=x")
    bridge = cp.client.server.app[MQTT]  # type: ignore[union-attr]
    topic = agent_topic(ident.agent_id, "desired", broker.prefix)
    async with broker.client(ident.agent_id, ident.mqtt["password"]) as c:
        await c.subscribe(topic, qos=1)
        async with asyncio.timeout(5):
            async for m in c.messages:
                assert m.payload  # the retained signed document
                break
    assert (await cp.call("POST", f"/agents/{ident.agent_id}/revoke")).status == 200
    before = bridge.malformed
    status = {
        "agentId": ident.agent_id,
        "generation": 1,
        "models": [],
        "sentAt": "2026-11-25T00:00:00Z",
    }
    async with broker.client(ident.agent_id, ident.mqtt["password"]) as c:
        await c.publish(
            agent_topic(ident.agent_id, "status", broker.prefix), json.dumps(status).encode(), qos=1
        )
    await eventually(lambda: bridge.malformed > before, 10)  # refused: no such agent

    async def cleared() -> bool:
        async with broker.client(CONTROL_PLANE_USER, CP_PASSWORD) as c:
            await c.subscribe(topic, qos=1)
            try:
                async with asyncio.timeout(1):
                    async for m in c.messages:
                        return not m.payload
            except TimeoutError:
                return True  # nothing retained any more
        return False

    await eventually(cleared, 10)
    await broker.load_passwords(cp)  # the regenerated file leaves it out
    try:
        async with broker.client(ident.agent_id, ident.mqtt["password"]):
            raise AssertionError("a revoked agent connected to the broker")
    except aiomqtt.MqttError:
        pass


async def test_an_installed_agent_keeps_the_broker_credentials_enrollment_hands_out(
    mcp: ControlPlane, publisher: Publisher, tmp_path: Path
) -> None:
    # `agent install` enrolled through a copy of the enrollment code that dropped the MQTT
    # credentials: an installed agent never used the broker. Both now share enroll_into.
    r = await mcp.call("POST", "/enrollment-tokens", json={"labels": {"site": "x"}})
    opts = InstallOptions(
        root=tmp_path / "root",
        server=mcp.url,
        token=(await r.json())["token"],
        name="edge-1",
        labels="site=x",
        serve=f"127.0.0.1:{free_port()}",
        trust_publisher=(publisher.pub_path,),
        start=False,
    )
    summary = await asyncio.to_thread(install, opts)
    assert summary.startswith("installed: agent")
    identity = json.loads((tmp_path / "root/var/lib/modelfleet/identity.json").read_text())
    assert identity["mqtt"]["username"] == identity["agent_id"]
    assert identity["mqtt"]["password"]
