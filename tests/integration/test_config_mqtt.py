"""A configuration change pushed over MQTT: the agent applies it within moments, with no poll."""

from __future__ import annotations

from pathlib import Path

import pytest

from protocol.desired import config_digest
from tests.support.agents import enroll_agent, eventually, running_agent
from tests.support.broker import Broker, mqtt_config
from tests.support.bundles import Publisher, iris_bundle
from tests.support.control_plane import start_control_plane

pytestmark = pytest.mark.slow

SCHEMA = {
    "type": "object",
    "properties": {"maxBatch": {"type": "integer", "minimum": 1, "default": 8}},
    "additionalProperties": False,
}


async def test_a_layer_reaches_an_mqtt_agent_pushed(
    tmp_path: Path, publisher: Publisher, broker: Broker
) -> None:
    cp = await start_control_plane(mqtt_config(tmp_path, publisher, broker))
    try:
        await cp.push(iris_bundle(publisher.key, "1.0.0", config_schema=SCHEMA))
        ident = await enroll_agent(cp, tmp_path / "a", {"site": "x"})
        await broker.load_passwords(cp)
        async with running_agent(tmp_path / "a", poll_interval_s=3600) as agent:
            await eventually(lambda: agent.mqtt is not None and agent.mqtt.connected, 10)
            await cp.rollout("1.0.0", "site=x")

            def digest() -> str | None:
                lm = agent.serving.get("iris")
                return lm.config_digest if lm is not None else None

            await eventually(lambda: digest() == config_digest({"maxBatch": 8}), 15)
            body = {"model": "iris", "scope": "agent", "agent": ident.agent_id}
            r = await cp.call("POST", "/config/layers", json={**body, "set": {"maxBatch": 2}})
            assert r.status == 200, await r.text()
            # Within seconds while the agent's next HTTP poll is an hour away: pushed.
            await eventually(lambda: digest() == config_digest({"maxBatch": 2}), 5, 0.01)

            async def reported() -> bool:
                r = await cp.call("GET", f"/config/agents/{ident.agent_id}")
                return all(m["applied"] for m in (await r.json())["models"])

            await eventually(reported, 10)
    finally:
        await cp.client.close()
