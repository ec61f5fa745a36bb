"""An attacker's pass over answers on MQTT (issue 17): what one hostile agent can make the
bridge hold while it reassembles answers, with a real broker and a real control plane."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from control_plane.mqtt.bridge import MqttBridge
from control_plane.state import MQTT
from protocol.commands import MAX_ANSWER_BYTES, answer_chunks, chunk_properties
from protocol.topics import agent_topic
from tests.support.agents import enroll_agent, eventually
from tests.support.broker import Broker, mqtt_config
from tests.support.bundles import Publisher
from tests.support.control_plane import ControlPlane, start_control_plane

pytestmark = pytest.mark.slow


def bridge_of(cp: ControlPlane) -> MqttBridge:
    bridge = cp.client.app[MQTT]
    assert isinstance(bridge, MqttBridge)
    return bridge


async def publish_chunks(broker: Broker, ident: Any, chunks: list[Any]) -> None:
    mqtt = ident.mqtt or {}
    topic = agent_topic(ident.agent_id, "commands/answer", broker.prefix)
    async with broker.client(mqtt["username"], mqtt["password"]) as c:
        for ch in chunks:
            props = Properties(PacketTypes.PUBLISH)
            props.UserProperty = chunk_properties(ch)
            await c.publish(topic, ch.data, qos=1, properties=props)


async def issue(cp: ControlPlane, agent_id: str, max_bytes: int) -> str:
    r = await cp.call(
        "POST", f"/agents/{agent_id}/commands", json={"kind": "logs", "maxBytes": max_bytes}
    )
    assert r.status == 202, await r.text()
    return str((await r.json())["commandId"])


async def test_one_agents_unfinished_answers_do_not_starve_another_agents_answer(
    tmp_path: Path, publisher: Publisher, broker: Broker, db_url: str
) -> None:
    cp = await start_control_plane(mqtt_config(tmp_path, publisher, broker, db_url=db_url))
    try:
        hostile = await enroll_agent(cp, tmp_path / "hostile", {"site": "x"})
        honest = await enroll_agent(cp, tmp_path / "honest", {"site": "x"})
        await broker.load_passwords(cp)
        bridge = bridge_of(cp)
        await eventually(lambda: bridge.connected.is_set(), 10)
        # The hostile agent starts an answer to every command it was given, each declaring
        # the most an answer may hold, and sends one chunk of each, never the rest.
        cids = [
            await issue(cp, hostile.agent_id, MAX_ANSWER_BYTES)
            for _ in range(cp.config.max_pending_commands)
        ]
        before = bridge.malformed
        for cid in cids:
            first = answer_chunks(cid, b"z" * MAX_ANSWER_BYTES)[0]
            await publish_chunks(broker, hostile, [first])
        await eventually(
            lambda: len(bridge.assemblies) + bridge.malformed - before >= len(cids), 20
        )
        held = [k for k in bridge.assemblies if k[0] == hostile.agent_id]
        assert len(held) <= 2, f"one agent holds {len(held)} unfinished answers"

        # The honest agent's answer still gets through.
        cid = await issue(cp, honest.agent_id, 4096)
        await publish_chunks(broker, honest, answer_chunks(cid, b"honest logs\n"))

        async def answered() -> bool:
            r = await cp.call("GET", f"/agents/{honest.agent_id}/commands/{cid}")
            return (await r.json())["state"] == "answered"

        await eventually(answered, 15)
    finally:
        await cp.client.close()


async def test_an_unsolicited_chunk_flood_holds_nothing(
    tmp_path: Path, publisher: Publisher, broker: Broker, db_url: str
) -> None:
    cp = await start_control_plane(mqtt_config(tmp_path, publisher, broker, db_url=db_url))
    try:
        hostile = await enroll_agent(cp, tmp_path / "hostile", {"site": "x"})
        await broker.load_passwords(cp)
        bridge = bridge_of(cp)
        await eventually(lambda: bridge.connected.is_set(), 10)
        before = bridge.malformed
        # 300 answers to commands that were never issued: each refused before a byte is held.
        flood = [answer_chunks(str(uuid.uuid4()), b"q" * 4096)[0] for _ in range(300)]
        await publish_chunks(broker, hostile, flood)
        await eventually(lambda: bridge.malformed - before >= 300, 30)
        assert bridge.assemblies == {}
    finally:
        await cp.client.close()
