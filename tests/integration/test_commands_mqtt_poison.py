"""An attacker's pass over the MQTT bridge (issue 17): user properties a conforming client
would not send (bytes that are not UTF-8, characters MQTT forbids in a string) on the
agent's answer topic must not stop the bridge: it sets the message aside and goes on."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from control_plane.mqtt.bridge import MqttBridge
from control_plane.state import MQTT
from protocol.commands import answer_chunks, chunk_properties
from protocol.topics import agent_topic
from tests.support.agents import enroll_agent, eventually
from tests.support.broker import Broker, mqtt_config
from tests.support.bundles import Publisher
from tests.support.control_plane import start_control_plane

pytestmark = pytest.mark.slow
USER_PROPERTY = 0x26


class RawProperties(Properties):
    """Properties packed from raw bytes, as a hostile client would put them on the wire."""

    def __init__(self, raw: bytes) -> None:
        super().__init__(PacketTypes.PUBLISH)
        object.__setattr__(self, "_raw", raw)  # Properties takes only MQTT names

    def pack(self) -> bytes:
        n, out = len(self._raw), b""
        while True:  # the properties' length, a variable byte integer
            byte, n = n % 128, n // 128
            out += bytes([byte | (128 if n else 0)])
            if not n:
                break
        return out + self._raw


def user_property(key: bytes, value: bytes) -> bytes:
    return (
        bytes([USER_PROPERTY])
        + len(key).to_bytes(2, "big")
        + key
        + len(value).to_bytes(2, "big")
        + value
    )


@pytest.mark.parametrize(
    "value",
    [
        b"\xff\xfe not utf-8",
        "\ufeff a BOM".encode(),
        b"nul \x00 inside",
        "\ud800".encode("utf-8", "surrogatepass"),
    ],
    ids=["not-utf8", "bom", "nul", "surrogate"],
)
async def test_a_user_property_mqtt_forbids_does_not_stop_the_bridge(
    tmp_path: Path, publisher: Publisher, broker: Broker, value: bytes
) -> None:
    cp = await start_control_plane(mqtt_config(tmp_path, publisher, broker))
    try:
        ident = await enroll_agent(cp, tmp_path / "hostile", {"site": "x"})
        await broker.load_passwords(cp)
        bridge = cp.client.app[MQTT]
        assert isinstance(bridge, MqttBridge)
        await eventually(lambda: bridge.connected.is_set(), 10)
        mqtt: dict[str, Any] = ident.mqtt or {}
        topic = agent_topic(ident.agent_id, "commands/answer", broker.prefix)
        async with broker.client(mqtt["username"], mqtt["password"]) as c:
            # The broker may drop the hostile client for it: that is fine too.
            with contextlib.suppress(aiomqtt.MqttError):
                await c.publish(
                    topic, b"x", qos=1, properties=RawProperties(user_property(b"commandId", value))
                )
        # The bridge still takes an honest answer afterwards, on the same session.
        r = await cp.call(
            "POST", f"/agents/{ident.agent_id}/commands", json={"kind": "logs", "maxBytes": 4096}
        )
        cid = (await r.json())["commandId"]
        async with broker.client(mqtt["username"], mqtt["password"]) as c:
            for ch in answer_chunks(cid, b"honest\n"):
                props = Properties(PacketTypes.PUBLISH)
                props.UserProperty = chunk_properties(ch)
                await c.publish(topic, ch.data, qos=1, properties=props)

        async def answered() -> bool:
            r = await cp.call("GET", f"/agents/{ident.agent_id}/commands/{cid}")
            return (await r.json())["state"] == "answered"

        await eventually(answered, 20)
    finally:
        await cp.client.close()
