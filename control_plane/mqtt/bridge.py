"""The control plane on MQTT: publish each agent's signed desired state (retained, QoS 1) and
take status, metrics and presence from a shared subscription, so several replicas split them.

Reports go through the same validation and storage as their HTTP routes, batched with them by
the process's Ingestor. Messages are handled concurrently (up to ``MAX_IN_FLIGHT``) so that
reports arriving together share a transaction, and each QoS 1 message is acknowledged to the
broker only once it is stored: a replica that dies between receiving and storing leaves it
unacknowledged in its persistent session, and the broker sends it again.

Every message ends in exactly one of three ways, each counted:

- **stored** (``stored[kind]``) and acknowledged;
- **malformed** (``malformed``): refused by validation, or anything unexpected raised while
  handling it (a deliberate boundary), logged with its topic and reason, acknowledged and
  dropped; it never stops the loop or holds up the messages of other agents;
- **left for redelivery** (``redelivery``): the link dropped before the acknowledgement, or
  the bridge stopped; the broker sends it again. A passing database failure (connection,
  timeout, busy) is retried with back-off, holding the message, until it is stored.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import urlsplit

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from sqlalchemy import select

from control_plane.catalog import registry
from control_plane.catalog.blobstore import BlobNotFound, BlobStore
from control_plane.config import ServerConfig
from control_plane.db.engine import Database
from control_plane.db.models import Agent, DesiredStateRow
from control_plane.errors import Conflict, DomainError
from control_plane.fleet import commands, reports
from control_plane.fleet.ingest import Ingestor
from control_plane.fleet.notify import DesiredNotifier
from control_plane.mqtt import paho_compat
from control_plane.security import audit
from control_plane.setaside import SeenOnce, is_transient, printable, reason_of
from protocol.backoff import Backoff
from protocol.commands import (
    MAX_ANSWER_BYTES,
    MAX_TTL,
    AnswerAssembly,
    AnswerChunk,
    parse_answer_chunk,
)
from protocol.digest import check_digest
from protocol.exceptions import ProtocolError
from protocol.fields import load_json_object
from protocol.reports import metrics_from_json, status_from_json
from protocol.topics import (
    MAX_CHUNK_BYTES,
    agent_topic,
    every_agent_filter,
    parse_agent_topic,
    shared_filter,
)

log = logging.getLogger("modelfleet.control_plane.mqtt")
SESSION_EXPIRY_S = 24 * 3600
MAX_IN_FLIGHT = 2000
# Answers being reassembled from their chunks: at most this many, of at most this many bytes
# together (declared sizes); past either, a new answer is set aside until room is made.
MAX_ASSEMBLIES = 64
MAX_ASSEMBLY_BYTES = 8 * MAX_ANSWER_BYTES
# One agent's share: an agent answers its commands one at a time, so two (one being resent)
# is all an honest one needs; without a share, one hostile agent given a few commands filled
# the whole budget with answers it never finished, and every other agent's answer was dropped.
MAX_ASSEMBLIES_PER_AGENT = 2


@dataclass
class _Assembly:
    """An answer being put together, whose is it and when it is given up."""

    parts: AnswerAssembly
    size: int
    until: datetime


def broker_address(url: str) -> tuple[str, int, bool]:
    """(host, port, TLS) of ``mqtt://host:1883`` or ``mqtts://host:8883``; raises ValueError."""
    u = urlsplit(url)
    if u.scheme not in ("mqtt", "mqtts") or not u.hostname:
        raise ValueError(
            f"broker URL must look like mqtt://host:1883 or mqtts://host:8883, got {url!r}"
        )
    tls = u.scheme == "mqtts"
    return u.hostname, u.port or (8883 if tls else 1883), tls


def tls_context(tls: bool, ca_file: str | None) -> ssl.SSLContext | None:
    """Verify the broker against a custom CA (or the system's) for mqtts://."""
    if not tls:
        return None
    return ssl.create_default_context(cafile=ca_file)


class MqttBridge:
    """One control plane replica's MQTT client."""

    def __init__(
        self,
        config: ServerConfig,
        db: Database,
        clock: Callable[[], datetime],
        *,
        store: BlobStore | None = None,
        ingest: Ingestor | None = None,
        answers: DesiredNotifier | None = None,
    ) -> None:
        assert config.mqtt_url
        paho_compat.install()  # a string paho refuses would keep the bridge off the broker
        self.config = config
        self.db = db
        self.store = store
        self.ingest = ingest or Ingestor(db, clock)
        self._in_flight = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._handlers: set[asyncio.Task[None]] = set()
        self.client: aiomqtt.Client | None = None
        self.clock = clock
        self.host, self.port, tls = broker_address(config.mqtt_url)
        self.tls = tls_context(tls, config.mqtt_ca_file)
        self.prefix = config.mqtt_prefix
        self.identifier = f"modelfleet-cp-{socket.gethostname()}-{config.port}"
        self.pending: asyncio.Queue[str] = asyncio.Queue()
        self.commands_pending: asyncio.Queue[str] = asyncio.Queue()  # agents with commands
        self.answers = answers  # woken with a command id when its answer is stored
        self.assemblies: dict[tuple[str, str], _Assembly] = {}
        self.answers_stored = 0
        self.answers_found_stored = 0  # whole answers another replica had stored first
        self.connected = asyncio.Event()
        self.malformed = 0
        self.redelivery = 0
        self.stored = {
            "status": 0,
            "metrics": 0,
            "presence": 0,
            "blobs/request": 0,
            "commands/answer": 0,
        }
        self._tracebacks = SeenOnce(100)  # one traceback per kind of unexpected failure

    def notify(self, agent_ids: list[str]) -> None:
        """Desired state changed for these agents, or a command waits for them: publish it."""
        for agent_id in agent_ids:
            self.pending.put_nowait(agent_id)
            self.commands_pending.put_nowait(agent_id)

    async def run(self) -> None:
        """Connect, subscribe, publish and consume; reconnect with jittered back-off.

        The back-off is capped at 5 s, not the 30 s of an agent's: while this bridge is away,
        agents' status reports over MQTT reach no subscriber (a restarted broker has no session
        to keep them in) and the fleet's picture waits for its return. One connection per
        replica reconnecting within seconds is no load on a broker that is back.
        """
        backoff = Backoff(cap=5.0)
        while True:
            try:
                await self._session(backoff)
                backoff.reset()
            except aiomqtt.MqttError as exc:
                self.connected.clear()
                delay = backoff.next_delay()
                log.warning(
                    "MQTT broker %s:%d: %s; retrying in %.1fs", self.host, self.port, exc, delay
                )
                await asyncio.sleep(delay)

    async def _session(self, backoff: Backoff) -> None:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        async with aiomqtt.Client(
            self.host,
            self.port,
            username=self.config.mqtt_username,
            password=self.config.mqtt_password,
            identifier=self.identifier,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=False,
            properties=props,
            tls_context=self.tls,
        ) as client:
            self.client = client
            # aiomqtt 2.5 has no manual acknowledgement of its own; paho's does it: a message
            # is acknowledged only after it is stored (see _handle_and_ack).
            client._client.manual_ack_set(True)
            for kind in ("status", "metrics", "presence", "blobs/request"):
                await client.subscribe(shared_filter(kind, self.prefix), qos=1)
            # Not shared: the chunks of one answer must meet in one replica, so each replica
            # takes them all and the first to store an answer wins (ADR 22).
            await client.subscribe(every_agent_filter("commands/answer", self.prefix), qos=1)
            self.connected.set()
            backoff.reset()  # up again: the next outage starts from the first delay
            log.info("MQTT connected to %s:%d", self.host, self.port)
            await self._publish_all(client)
            publisher = asyncio.create_task(self._publisher(client), name="mqtt-publisher")
            command_publisher = asyncio.create_task(
                self._command_publisher(client), name="mqtt-command-publisher"
            )
            try:
                async for message in client.messages:
                    await self._in_flight.acquire()
                    try:
                        task = asyncio.create_task(self._handle_and_ack(client, message))
                    except BaseException:
                        self._in_flight.release()
                        raise
                    self._handlers.add(task)
                    # Released when the task ends however it ends, even cancelled before it
                    # ever ran (a finally inside it would not run then, and leak the place).
                    task.add_done_callback(self._handler_done)
            finally:
                publisher.cancel()
                handlers = [publisher, command_publisher, *self._handlers]
                for t in handlers:
                    t.cancel()
                await asyncio.gather(*handlers, return_exceptions=True)
                self.connected.clear()

    def _handler_done(self, task: asyncio.Task[None]) -> None:
        self._handlers.discard(task)
        self._in_flight.release()
        if not task.cancelled() and task.exception() is not None:
            # _handle_and_ack ends every message itself; this is a bug, said once per task.
            log.error("MQTT handler failed", exc_info=task.exception())

    async def _handle_and_ack(self, client: aiomqtt.Client, message: aiomqtt.Message) -> None:
        """Handle one message, retrying passing database failures, then acknowledge it."""
        topic = str(message.topic)
        try:
            backoff = Backoff(base=0.2, cap=5.0)
            while True:
                try:
                    await self.handle(topic, message.payload, message.properties)  # type: ignore[arg-type]
                    break
                except aiomqtt.MqttError:
                    raise
                except Exception as exc:  # handle() lets only passing failures out
                    delay = backoff.next_delay()
                    log.warning(
                        "storing MQTT message on %s failed (%s); retrying in %.1fs",
                        printable(topic, 200),
                        reason_of(exc),
                        delay,
                    )
                    await asyncio.sleep(delay)
            if message.qos > 0:
                client._client.ack(message.mid, message.qos)
        except aiomqtt.MqttError as exc:
            # The link dropped mid-answer: unacknowledged, the broker sends it again.
            self.redelivery += 1
            log.info("MQTT message on %s left for redelivery: %s", printable(topic, 200), exc)
        except asyncio.CancelledError:
            self.redelivery += 1  # the session ended: unacknowledged, it comes again
            raise

    async def _publish_all(self, client: aiomqtt.Client) -> None:
        """After a (re)connect the broker gets every agent's current document again."""
        async with self.db.read() as s:
            ids = list(await s.scalars(select(DesiredStateRow.agent_id)))
        for agent_id in ids:
            self.pending.put_nowait(agent_id)
        for agent_id in await commands.agents_with_pending(self.db, self.clock()):
            self.commands_pending.put_nowait(agent_id)

    async def _command_publisher(self, client: aiomqtt.Client) -> None:
        """Publish the commands waiting for agents on their own topics (QoS 1, not retained:
        a command is for now, and expires); those the broker says are online are handed over."""
        while True:
            batch = {await self.commands_pending.get()}
            while not self.commands_pending.empty() and len(batch) < 500:
                batch.add(self.commands_pending.get_nowait())
            now = self.clock()
            try:
                found = await commands.waiting_envelopes(self.db, sorted(batch), now)
            except Exception as exc:
                # Deliberate boundary: a database that is away for a moment must not end this
                # publisher for the rest of the session; the batch waits and is tried again.
                log.warning("reading waiting commands failed (%s); retrying", reason_of(exc))
                for agent_id in batch:
                    self.commands_pending.put_nowait(agent_id)
                await asyncio.sleep(1.0)
                continue
            for i, (_, agent_id, envelope) in enumerate(found):
                try:
                    await client.publish(
                        agent_topic(agent_id, "commands", self.prefix), envelope.encode(), qos=1
                    )
                except aiomqtt.MqttError:
                    for _, again, _ in found[i:]:  # sent again after the reconnect
                        self.commands_pending.put_nowait(again)
                    raise
            try:
                await commands.mark_delivered(self.db, [cid for cid, _, _ in found], now, "mqtt")
            except Exception as exc:
                # Deliberate boundary: they were published; left pending, an HTTP long-poll may
                # hand them over again, and the agent refuses what it has already carried out.
                log.warning("marking commands delivered failed: %s", reason_of(exc))

    async def _publisher(self, client: aiomqtt.Client) -> None:
        while True:
            batch = {await self.pending.get()}
            while not self.pending.empty() and len(batch) < 500:
                batch.add(self.pending.get_nowait())
            async with self.db.read() as s:
                rows = list(
                    await s.scalars(
                        select(DesiredStateRow).where(DesiredStateRow.agent_id.in_(batch))
                    )
                )
                # An agent with no desired state that is revoked (or gone): clear its retained
                # document. One never given any (a command woke it) has nothing to clear, and
                # an empty document would only be refused by it.
                gone = batch - {r.agent_id for r in rows}
                kept = set(
                    await s.scalars(
                        select(Agent.id).where(Agent.id.in_(gone), Agent.revoked_at.is_(None))
                    )
                )
            for cleared in sorted(gone - kept):
                await client.publish(
                    agent_topic(cleared, "desired", self.prefix), b"", qos=1, retain=True
                )
            for i, row in enumerate(rows):
                try:
                    await client.publish(
                        agent_topic(row.agent_id, "desired", self.prefix),
                        row.envelope.encode(),
                        qos=1,
                        retain=True,
                    )
                except aiomqtt.MqttError:
                    for r in rows[i:]:  # sent again after the reconnect
                        self.pending.put_nowait(r.agent_id)
                    raise

    async def handle(
        self, topic: str, payload: bytes, properties: Properties | None = None
    ) -> None:
        """Store one report (or answer a chunk request); log, count and drop anything malformed.

        Raises only what leaves the message for later: aiomqtt.MqttError (the link dropped)
        and passing database failures (see control_plane.setaside.is_transient).
        """
        try:
            if not isinstance(payload, bytes | bytearray):
                raise ProtocolError(f"the payload is {type(payload).__name__}, not bytes")
            payload = bytes(payload)
            agent_id, kind = parse_agent_topic(topic, self.prefix)
            now = self.clock()
            if kind == "blobs/request":
                await self._answer(agent_id, payload, properties)
            elif kind == "commands/answer":
                await self._command_answer(agent_id, payload, properties, now)
            elif kind == "presence":
                text = payload.decode(errors="replace")
                if text not in ("online", "offline"):
                    raise ProtocolError(f"presence must be online or offline, got {text[:40]!r}")
                await reports.store_presence(self.db, agent_id, text, now)
                if text == "online":
                    # Commands published while it had no session on the broker were lost
                    # there: what still waits for it goes now (it refuses a repeat by id).
                    self.commands_pending.put_nowait(agent_id)
            else:
                doc = load_json_object(payload, f"{kind} payload", self.config.max_json_bytes)
                if doc.get("agentId") != agent_id:
                    raise ProtocolError("agentId does not match the topic's agent")
                if kind == "status":
                    await self.ingest.status(status_from_json(doc))
                elif kind == "metrics":
                    batch = metrics_from_json(doc)
                    stored = await self.ingest.metrics(batch)
                    # End to end: the agent forgets a batch only on this word, not on the
                    # broker's PUBACK (a broker restart can lose what it had in flight).
                    ack = json.dumps({"seq": batch.seq, "stored": stored}).encode()
                    await self._publish(agent_topic(agent_id, "metrics/ack", self.prefix), ack)
                else:
                    raise ProtocolError(f"the control plane does not take {kind} messages")
            self.stored[kind] = self.stored.get(kind, 0) + 1
        except aiomqtt.MqttError:
            raise
        except (ProtocolError, ValueError, DomainError) as exc:
            if is_transient(exc):
                raise
            self._set_aside(topic, str(exc))
        except Exception as exc:
            if is_transient(exc):
                raise
            # Deliberate boundary: nothing one message holds may stop the bridge or hold up
            # other agents' messages; it is malformed by definition, with what it raised.
            first = self._tracebacks.first((type(exc), _where(exc)))
            self._set_aside(topic, reason_of(exc), exc if first else None)

    def _set_aside(self, topic: str, reason: str, exc: BaseException | None = None) -> None:
        self.malformed += 1
        log.warning(
            "dropped malformed MQTT message on %s: %s",
            printable(topic, 200),
            printable(reason),
            exc_info=exc,
        )

    async def _publish(self, topic: str, payload: bytes) -> None:
        client = self.client
        if client is None:
            raise aiomqtt.MqttError("not connected")
        await client.publish(topic, payload, qos=1)

    async def _answer(self, agent_id: str, payload: bytes, props: Properties | None) -> None:
        """One chunk of a blob (or a manifest envelope) to the agent's own response topic."""
        corr = getattr(props, "CorrelationData", None) if props is not None else None
        if not corr:
            raise ProtocolError("a blob request needs correlation data")
        doc = load_json_object(payload, "blob request", self.config.max_json_bytes)
        data, size, error = b"", 0, ""
        if "manifest" in doc:
            try:
                data = (
                    await registry.get_envelope(self.db, check_digest(doc["manifest"]))
                ).encode()
                size = len(data)
            except DomainError as exc:
                error = exc.message
        else:
            digest = check_digest(doc.get("digest"), "digest")
            offset, length = doc.get("offset"), doc.get("length", MAX_CHUNK_BYTES)
            if (
                not isinstance(offset, int)
                or not isinstance(length, int)
                or offset < 0
                or not (0 < length <= MAX_CHUNK_BYTES)
            ):
                raise ProtocolError(f"offset and length (at most {MAX_CHUNK_BYTES}) must be counts")
            assert self.store is not None
            try:
                data, size = await asyncio.to_thread(
                    _read_chunk, self.store, digest, offset, length
                )
            except BlobNotFound as exc:
                error = exc.message
        reply = Properties(PacketTypes.PUBLISH)
        reply.CorrelationData = corr
        reply.UserProperty = [("size", str(size))] + ([("error", error)] if error else [])
        client = self.client
        if client is not None:
            # Always the requester's own response topic: a request cannot aim answers elsewhere.
            await client.publish(
                agent_topic(agent_id, "blobs/response", self.prefix), data, qos=1, properties=reply
            )

    async def _command_answer(
        self, agent_id: str, payload: bytes, props: Properties | None, now: datetime
    ) -> None:
        """One chunk of an agent's answer to a command; the whole answer, once its digest
        checks, is stored by the same rules as over HTTP. Raises what handle() sets aside.

        Every replica takes every chunk, so every replica but one finds the answer stored
        already: that is counted in ``answers_found_stored``, not set aside as malformed."""
        user = getattr(props, "UserProperty", None) if props is not None else None
        if not isinstance(user, list) or len(user) > 16:
            raise ProtocolError("an answer chunk needs its user properties")
        chunk = parse_answer_chunk({str(k): str(v) for k, v in user}, payload)
        try:
            await self._assemble_answer(agent_id, chunk, now)
        except Conflict as exc:
            if exc.code != "already_answered" or not await commands.answered_with(
                self.db,
                agent_id,
                chunk.command_id,
                digest=chunk.digest,
                failed=chunk.error is not None,
            ):
                raise
            self.answers_found_stored += 1
            log.debug("answer %s of agent %s stored already", chunk.command_id, agent_id)

    async def _assemble_answer(self, agent_id: str, chunk: AnswerChunk, now: datetime) -> None:
        """Add a checked chunk to its answer, and store the answer once it is whole."""
        for key in [k for k, a in self.assemblies.items() if a.until <= now]:
            del self.assemblies[key]
            self._set_aside(f"answer {key[1]} of agent {key[0]}", "its chunks stopped coming")
        key = (agent_id, chunk.command_id)
        held = self.assemblies.get(key)
        if held is None:
            # The command's owner, state and size cap, before a byte is held for it.
            limit, expires = await commands.answer_terms(self.db, agent_id, chunk.command_id, now)
            # Chunks are handled concurrently: another of this answer may have begun it meanwhile.
            held = self.assemblies.get(key)
        if held is None:
            mine = sum(1 for k in self.assemblies if k[0] == agent_id)
            if mine >= MAX_ASSEMBLIES_PER_AGENT:
                raise ProtocolError(
                    f"agent already has {mine} answers being reassembled: finish one first"
                )
            busy = sum(a.size for a in self.assemblies.values())
            if len(self.assemblies) >= MAX_ASSEMBLIES or busy + chunk.size > MAX_ASSEMBLY_BYTES:
                raise ProtocolError("too many answers being reassembled: try again later")
            # Given up when its command expires: no answer is taken after that anyway.
            until = min(now + MAX_TTL, expires)
            held = _Assembly(AnswerAssembly(chunk, limit), chunk.size, until)
            self.assemblies[key] = held
        try:
            data = held.parts.add(chunk)
        except ProtocolError:
            del self.assemblies[key]  # the answer cannot be trusted whole any more
            raise
        if data is None:
            return
        del self.assemblies[key]
        error = held.parts.error
        await commands.store_answer(
            self.db, agent_id, chunk.command_id, data=data, now=now, via="mqtt", error=error
        )
        self.answers_stored += 1
        if self.answers is not None:
            self.answers.wake([chunk.command_id])
        await audit.append(
            self.db,
            now,
            f"agent:{agent_id}",
            "MQTT commands/answer",
            chunk.command_id,
            200,
            "mqtt",
            {"bytes": len(data), "digest": chunk.digest, "failed": error is not None},
        )


def _where(exc: BaseException) -> str:
    """Where an exception was raised (file and line of its innermost frame)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb is not None else ""


def _read_chunk(store: BlobStore, digest: str, offset: int, length: int) -> tuple[bytes, int]:
    size = store.size(digest)
    length = max(0, min(length, size - offset))
    return b"".join(store.open_range(digest, offset, length)), size
