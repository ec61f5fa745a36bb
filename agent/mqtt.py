"""The agent on MQTT: desired state pushed to it (QoS 1, persistent session), status and
metrics published, presence with a retained Last Will. HTTP stays the fallback that always
works: while the broker is away the agent long-polls and reports over HTTP, and comes back to
MQTT by itself when the broker does."""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from protocol.topics import DEFAULT_PREFIX, agent_topic

log = logging.getLogger("modelfleet.agent.mqtt")
SESSION_EXPIRY_S = 7 * 24 * 3600


class MqttLink:
    """One agent's connection to the broker."""

    def __init__(
        self,
        agent_id: str,
        url: str,
        username: str | None,
        password: str | None,
        prefix: str,
        on_desired: Callable[[bytes], Awaitable[bool]],
        on_change: Callable[[bool], None],
    ) -> None:
        u = urlsplit(url)
        if u.scheme != "mqtt" or not u.hostname:
            raise ValueError(f"broker URL must look like mqtt://host:1883, got {url!r}")
        self.host, self.port = u.hostname, u.port or 1883
        self.agent_id = agent_id
        self.username, self.password = username, password
        self.prefix = prefix or DEFAULT_PREFIX
        self.on_desired = on_desired
        self.on_change = on_change
        self.client: aiomqtt.Client | None = None
        self.connected = False

    def topic(self, kind: str) -> str:
        """One of this agent's topics."""
        return agent_topic(self.agent_id, kind, self.prefix)

    async def run(self) -> None:
        """Stay connected; back off with jitter while the broker is away."""
        attempt = 0
        while True:
            try:
                await self._session()
                attempt = 0
            except aiomqtt.MqttError as exc:
                self._set(False)
                delay = random.uniform(0, min(30.0, 0.5 * 1.5 ** min(attempt, 10)))
                attempt += 1
                log.info("MQTT %s:%d unavailable (%s); HTTP meanwhile, retry in %.1fs",
                         self.host, self.port, exc, delay)  # fmt: skip
                await asyncio.sleep(delay)

    def _set(self, connected: bool) -> None:
        if connected != self.connected:
            self.connected = connected
            self.on_change(connected)

    async def _session(self) -> None:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        will = aiomqtt.Will(self.topic("presence"), b"offline", qos=1, retain=True)
        async with aiomqtt.Client(
            self.host, self.port, username=self.username, password=self.password,
            identifier=f"modelfleet-agent-{self.agent_id}", protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=False, properties=props, will=will, keepalive=30,
        ) as client:  # fmt: skip
            self.client = client
            try:
                await client.subscribe(self.topic("desired"), qos=1)
                await client.publish(self.topic("presence"), b"online", qos=1, retain=True)
                self._set(True)
                log.info("MQTT connected to %s:%d", self.host, self.port)
                async for message in client.messages:
                    payload = message.payload
                    if isinstance(payload, bytes | bytearray):
                        await self.on_desired(bytes(payload))
            finally:
                self.client = None
                self._set(False)

    async def publish(self, kind: str, doc: dict[str, Any]) -> bool:
        """Publish a report QoS 1; False when not connected or it failed (use HTTP then)."""
        client = self.client
        if client is None or not self.connected:
            return False
        try:
            async with asyncio.timeout(10):
                await client.publish(self.topic(kind), json.dumps(doc).encode(), qos=1)
            return True
        except (aiomqtt.MqttError, TimeoutError):
            return False

    async def say_offline(self) -> None:
        """A clean goodbye (the Last Will covers the unclean ones)."""
        client = self.client
        if client is not None:
            try:
                async with asyncio.timeout(3):
                    await client.publish(self.topic("presence"), b"offline", qos=1, retain=True)
            except (aiomqtt.MqttError, TimeoutError):
                pass
