"""The agent on MQTT: desired state pushed to it (QoS 1, persistent session), status and
metrics published, presence with a retained Last Will. HTTP stays the fallback that always
works: while the broker is away the agent long-polls and reports over HTTP, and comes back to
MQTT by itself when the broker does."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.client import OnChunk, partial_size
from agent.exceptions import TransportError, UpdateError
from protocol.backoff import Backoff
from protocol.commands import answer_chunks, chunk_properties
from protocol.topics import DEFAULT_PREFIX, MAX_CHUNK_BYTES, agent_topic

log = logging.getLogger("modelfleet.agent.mqtt")
SESSION_EXPIRY_S = 7 * 24 * 3600
REQUEST_TIMEOUT_S = 15.0
WINDOW = 4  # chunk requests in flight at once


@dataclass(frozen=True)
class MqttSettings:
    """Where and as whom an agent connects (what enrollment handed out, and the CA to trust)."""

    url: str  # mqtt://host:1883 or mqtts://host:8883
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    prefix: str = ""  # "" means protocol.topics.DEFAULT_PREFIX
    ca_file: str | None = None  # mqtts: the CA that signed the broker's certificate


class MqttLink:
    """One agent's connection to the broker."""

    def __init__(
        self,
        agent_id: str,
        settings: MqttSettings,
        *,
        on_desired: Callable[[bytes], Awaitable[bool]],
        on_change: Callable[[bool], None],
        on_metrics_ack: Callable[[int], Awaitable[None]] | None = None,
        on_command: Callable[[bytes], None] | None = None,
    ) -> None:
        u = urlsplit(settings.url)
        if u.scheme not in ("mqtt", "mqtts") or not u.hostname:
            raise ValueError(f"broker URL must look like mqtt://host:1883, got {settings.url!r}")
        tls = u.scheme == "mqtts"
        self.host, self.port = u.hostname, u.port or (8883 if tls else 1883)
        # mqtts: verify the broker against a custom CA (or the system's).
        self.tls = ssl.create_default_context(cafile=settings.ca_file) if tls else None
        self.agent_id = agent_id
        self.username, self.password = settings.username, settings.password
        self.prefix = settings.prefix or DEFAULT_PREFIX
        self.on_desired = on_desired
        self.on_change = on_change
        self.on_metrics_ack = on_metrics_ack
        self.on_command = on_command
        self.client: aiomqtt.Client | None = None
        self.connected = False
        self._replies: dict[bytes, asyncio.Future[tuple[bytes, dict[str, str]]]] = {}

    def topic(self, kind: str) -> str:
        """One of this agent's topics."""
        return agent_topic(self.agent_id, kind, self.prefix)

    async def run(self) -> None:
        """Stay connected; back off with jitter while the broker is away."""
        backoff = Backoff(base=0.5, cap=30.0, factor=1.5)
        while True:
            try:
                await self._session(backoff)
                backoff.reset()
            except aiomqtt.MqttError as exc:
                self._set(False)
                delay = backoff.next_delay()
                log.info(
                    "MQTT %s:%d unavailable (%s); HTTP meanwhile, retry in %.1fs",
                    self.host,
                    self.port,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)

    def _set(self, connected: bool) -> None:
        if connected != self.connected:
            self.connected = connected
            self.on_change(connected)

    async def _session(self, backoff: Backoff) -> None:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        will = aiomqtt.Will(self.topic("presence"), b"offline", qos=1, retain=True)
        async with aiomqtt.Client(
            self.host,
            self.port,
            username=self.username,
            password=self.password,
            identifier=f"modelfleet-agent-{self.agent_id}",
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=False,
            properties=props,
            will=will,
            keepalive=30,
            tls_context=self.tls,
        ) as client:
            self.client = client
            try:
                await client.subscribe(self.topic("desired"), qos=1)
                await client.subscribe(self.topic("blobs/response"), qos=1)
                await client.subscribe(self.topic("metrics/ack"), qos=1)
                if self.on_command is not None:
                    await client.subscribe(self.topic("commands"), qos=1)
                await client.publish(self.topic("presence"), b"online", qos=1, retain=True)
                self._set(True)
                backoff.reset()  # up again: the next outage starts from the first delay
                log.info("MQTT connected to %s:%d", self.host, self.port)
                response_topic = self.topic("blobs/response")
                ack_topic = self.topic("metrics/ack")
                command_topic = self.topic("commands")
                async for message in client.messages:
                    payload = message.payload
                    if not isinstance(payload, bytes | bytearray):
                        continue
                    if str(message.topic) == response_topic:
                        self._reply(bytes(payload), message.properties)
                    elif str(message.topic) == ack_topic:
                        await self._metrics_ack(bytes(payload))
                    elif str(message.topic) == command_topic:
                        if self.on_command is not None:
                            self.on_command(bytes(payload))  # queued: checked and carried out apart
                    else:
                        await self.on_desired(bytes(payload))
            finally:
                self.client = None
                for fut in self._replies.values():
                    if not fut.done():
                        fut.set_exception(TransportError("MQTT connection lost"))
                self._replies.clear()
                self._set(False)

    async def _metrics_ack(self, payload: bytes) -> None:
        try:
            seq = json.loads(payload)["seq"]
        except (ValueError, KeyError, TypeError):
            log.warning("ignored a malformed metrics acknowledgement: %r", payload[:80])
            return
        if isinstance(seq, int) and not isinstance(seq, bool) and self.on_metrics_ack:
            await self.on_metrics_ack(seq)

    def _reply(self, payload: bytes, props: Properties | None) -> None:
        corr = getattr(props, "CorrelationData", None) if props is not None else None
        fut = self._replies.pop(bytes(corr), None) if corr else None
        if fut is not None and not fut.done():
            user = dict(getattr(props, "UserProperty", []) or [])
            fut.set_result((payload, user))

    async def request(self, doc: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
        """Ask the control plane over MQTT 5 request/response; raises TransportError."""
        client = self.client
        if client is None or not self.connected:
            raise TransportError("MQTT is not connected")
        corr = uuid.uuid4().bytes
        fut: asyncio.Future[tuple[bytes, dict[str, str]]] = (
            asyncio.get_running_loop().create_future()
        )
        self._replies[corr] = fut
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self.topic("blobs/response")
        props.CorrelationData = corr
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                await client.publish(
                    self.topic("blobs/request"), json.dumps(doc).encode(), qos=1, properties=props
                )
                return await fut
        except (aiomqtt.MqttError, TimeoutError) as exc:
            raise TransportError(f"MQTT request {doc}: {exc!r}") from exc
        finally:
            self._replies.pop(corr, None)

    async def fetch_manifest(self, digest: str) -> bytes:
        """A version's signed manifest envelope; raises TransportError or UpdateError."""
        data, user = await self.request({"manifest": digest})
        if user.get("error"):
            raise UpdateError(f"manifest {digest}: {user['error']}")
        return data

    async def fetch_blob(
        self, digest: str, size: int, dest: Path, on_chunk: OnChunk | None = None
    ) -> None:
        """Fetch the missing chunks of a blob into ``dest`` with a bounded window in flight,
        resuming from the bytes already there; the caller verifies the digest.

        Raises TransportError (resume later) or UpdateError (the server has no such blob).
        """
        have = await asyncio.to_thread(partial_size, dest, size)
        with dest.open("r+b" if have else "wb") as f:
            f.seek(have)
            f.truncate()
            while have < size:
                offsets = range(have, min(size, have + WINDOW * MAX_CHUNK_BYTES), MAX_CHUNK_BYTES)
                replies = await asyncio.gather(
                    *(
                        self.request(
                            {
                                "digest": digest,
                                "offset": o,
                                "length": min(MAX_CHUNK_BYTES, size - o),
                            }
                        )
                        for o in offsets
                    )
                )
                for offset, (data, user) in zip(offsets, replies, strict=True):
                    if user.get("error"):
                        raise UpdateError(f"blob {digest}: {user['error']}")
                    expected = min(MAX_CHUNK_BYTES, size - offset)
                    if len(data) != expected or user.get("size") != str(size):
                        raise TransportError(f"blob {digest}: bad chunk at {offset}")
                    await asyncio.to_thread(f.write, data)
                    have += len(data)
                    if on_chunk is not None:
                        await on_chunk(len(data), have)

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

    async def publish_answer(self, command_id: str, data: bytes, error: str | None = None) -> bool:
        """Publish the answer to a command on this agent's answer topic, in chunks of at most
        ANSWER_CHUNK_BYTES (QoS 1); False when not connected or it failed (use HTTP then)."""
        client = self.client
        if client is None or not self.connected:
            return False
        try:
            for chunk in answer_chunks(command_id, data, error):
                props = Properties(PacketTypes.PUBLISH)
                props.UserProperty = chunk_properties(chunk)
                async with asyncio.timeout(30):
                    await client.publish(
                        self.topic("commands/answer"), chunk.data, qos=1, properties=props
                    )
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
