"""The operator's command channel on the agent (protocol/commands.py): receive, accept, answer.

Commands come by whichever transport the agent syncs over: its MQTT topic while the link is
up (pushed), an HTTP long-poll while it is down (and a look now and then while it is up, like
the desired-state sync). Each is accepted only by ``accept_command``: signed by the control
plane's key, for this agent, not expired, not seen before. The ids seen are kept until their
command expires, in the state directory, so a restart does not reopen a replay.

The answer (log lines since N seconds, or the support bundle of agent/host/diagnostics.py) is
built within the command's ``maxBytes`` off the event loop and goes back by the transport the
command came by (HTTP when MQTT is down). A refused or failing command is logged and counted;
nothing one command does stops the loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.client import ControlPlaneClient
from agent.exceptions import HttpStatusError, TransportError
from agent.host.diagnostics import LogRing, capped_lines, support_bundle
from agent.keyring import KeyRing
from agent.mqtt import MqttLink
from agent.storage.statefile import read_json, write_json
from protocol.backoff import Backoff
from protocol.commands import Command, accept_command
from protocol.exceptions import ProtocolError, SignatureError
from protocol.timeutil import format_time, parse_time

log = logging.getLogger("modelfleet.agent.commands")
SEEN_FILE = "commands-seen.json"
MAX_SEEN = 1000  # the control plane keeps at most a few commands waiting per agent
MAX_QUEUED = 32


def _utcnow() -> datetime:
    return datetime.now(UTC)


class SeenCommands:
    """Ids of commands carried out, each kept until its command expires, saved atomically."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._ids: dict[str, datetime] = {}
        try:
            doc = read_json(path, {})
        except (OSError, ValueError) as exc:
            log.warning("%s unreadable (%s): starting with no seen commands", path, exc)
            doc = {}
        for cid, at in doc.items() if isinstance(doc, dict) else []:
            try:
                self._ids[str(cid)[:64]] = parse_time(at, "expiresAt")
            except ProtocolError:
                continue  # a damaged entry: its command expired long ago or never existed

    def ids(self, now: datetime) -> set[str]:
        """The ids whose commands have not expired yet."""
        return {cid for cid, until in self._ids.items() if until > now}

    def add(self, cmd: Command, now: datetime) -> None:
        """Remember a command until it expires (and forget expired ones); raises OSError."""
        self._ids = {cid: until for cid, until in self._ids.items() if until > now}
        self._ids[cmd.command_id] = cmd.expires_at
        if len(self._ids) > MAX_SEEN:  # keep the ones that expire last
            keep = sorted(self._ids.items(), key=lambda kv: kv[1])[-MAX_SEEN:]
            self._ids = dict(keep)
        write_json(self.path, {cid: format_time(t) for cid, t in self._ids.items()})


@dataclass(frozen=True, kw_only=True)
class Answer:
    """What goes back: the bytes, or why there are none."""

    data: bytes = b""
    error: str | None = None


def build_answer(
    cmd: Command,
    *,
    ring: LogRing,
    state_dir: Path,
    facts: Mapping[str, Any],
    failures: Iterable[Mapping[str, Any]],
) -> Answer:
    """The answer to an accepted command, within its maxBytes (blocking: run it in a thread)."""
    lines = ring.lines(cmd.since_s)
    if cmd.kind == "logs":
        kept = capped_lines(lines, cmd.max_bytes)
        return Answer(data="".join(f"{line}\n" for line in kept).encode())
    try:
        return Answer(
            data=support_bundle(
                state_dir=state_dir,
                log_lines=lines,
                facts=facts,
                failures=failures,
                max_bytes=cmd.max_bytes,
            )
        )
    except ValueError as exc:
        return Answer(error=str(exc))


class CommandChannel:
    """The agent's part that takes operator commands and answers them."""

    def __init__(
        self,
        *,
        agent_id: str,
        state_dir: Path,
        client: ControlPlaneClient,
        keyring: KeyRing,
        mqtt: MqttLink | None,
        ring: LogRing,
        facts: Callable[[], Mapping[str, Any]],
        failures: Callable[[], list[dict[str, Any]]],
        poll_wait_s: float,
        poll_interval_s: float,
    ) -> None:
        self.agent_id = agent_id
        self.state_dir = state_dir
        self.client = client
        self.keyring = keyring
        self.mqtt = mqtt
        self.ring = ring
        self.facts = facts
        self.failures = failures
        self.poll_wait_s = poll_wait_s
        self.poll_interval_s = poll_interval_s
        self.seen = SeenCommands(state_dir / SEEN_FILE)
        self._queue: asyncio.Queue[tuple[bytes, str]] = asyncio.Queue(MAX_QUEUED)
        self._link_changed = asyncio.Event()
        self.answered = 0
        self.refused = 0
        self.failed = 0
        self.last_refusal: str | None = None

    def link_changed(self) -> None:
        """The MQTT link dropped or came back: re-decide how to receive at once."""
        self._link_changed.set()

    def receive(self, envelope: bytes, via: str) -> None:
        """A command envelope arrived (``via`` http or mqtt); it is checked in the loop."""
        try:
            self._queue.put_nowait((envelope, via))
        except asyncio.QueueFull:
            self._refuse(f"over {MAX_QUEUED} commands waiting: one dropped")

    async def run(self) -> None:
        """Receive by HTTP while MQTT is down, and carry commands out one at a time."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._poll_loop(), name="agent-commands-poll")
            tg.create_task(self._work_loop(), name="agent-commands-work")

    # ------------------------------------------------------------------------ receiving

    async def _poll_loop(self) -> None:
        backoff = Backoff()
        while True:
            pushed = self.mqtt is not None and self.mqtt.connected
            self._link_changed.clear()
            if pushed:
                try:
                    async with asyncio.timeout(self.poll_interval_s):
                        await self._link_changed.wait()
                    continue  # the link dropped (or came back): re-decide at once
                except TimeoutError:
                    pass
            try:
                envelopes = await self._poll(0 if pushed else self.poll_wait_s)
            except HttpStatusError as exc:
                # An older control plane without the route answers 404: ask again, slowly.
                log.debug("command poll: %s", exc)
                await asyncio.sleep(min(self.poll_interval_s, 5 + backoff.next_delay()))
                continue
            except TransportError as exc:
                log.debug("command poll failed: %s", exc)
                await asyncio.sleep(backoff.next_delay())
                continue
            except Exception:
                # Deliberate boundary: nothing one poll does may end the channel for good.
                log.exception("command poll failed")
                await asyncio.sleep(backoff.next_delay())
                continue
            backoff.reset()
            for envelope in envelopes or ():
                self.receive(envelope, "http")

    async def _poll(self, wait: float) -> list[bytes] | None:
        """One long-poll, given up at once when the MQTT link comes up meanwhile."""
        poll = asyncio.ensure_future(self.client.poll_commands(wait))
        link = asyncio.ensure_future(self._link_changed.wait())
        try:
            await asyncio.wait({poll, link}, return_when=asyncio.FIRST_COMPLETED)
            if poll.done():
                return poll.result()
            return None
        finally:
            for t in (poll, link):
                t.cancel()
            await asyncio.gather(poll, link, return_exceptions=True)

    # ------------------------------------------------------------------------ carrying out

    async def _work_loop(self) -> None:
        while True:
            envelope, via = await self._queue.get()
            try:
                await self.handle(envelope, via)
            except asyncio.CancelledError:
                raise
            except Exception:
                # Deliberate boundary: one command, whatever it does, never ends the channel.
                self.failed += 1
                log.exception("command failed")

    def _refuse(self, reason: str) -> None:
        self.refused += 1
        self.last_refusal = reason
        log.warning("refused command: %s", reason)

    async def handle(self, envelope: bytes, via: str) -> None:
        """Accept one command, carry it out and send the answer; a refusal is logged."""
        cmd = await self._accept(envelope)
        if cmd is None:
            return
        log.info("command %s (%s, %ds) accepted via %s", cmd.command_id, cmd.kind, cmd.since_s, via)
        answer = await asyncio.to_thread(
            build_answer,
            cmd,
            ring=self.ring,
            state_dir=self.state_dir,
            facts=self.facts(),
            failures=self.failures(),
        )
        await self._send(cmd, answer, via)

    async def _accept(self, envelope: bytes) -> Command | None:
        now = _utcnow()
        try:
            try:
                cmd = accept_command(
                    envelope, self.keyring.cp_keys, self.agent_id, now, self.seen.ids(now)
                )
            except SignatureError:
                # Perhaps signed by a rotated control plane key that a newer key set lists.
                if not await self.keyring.refresh():
                    raise
                cmd = accept_command(
                    envelope, self.keyring.cp_keys, self.agent_id, now, self.seen.ids(now)
                )
        except ProtocolError as exc:
            self._refuse(str(exc))
            return None
        # Remembered before it is carried out: a crash midway does not reopen it.
        await asyncio.to_thread(self.seen.add, cmd, now)
        return cmd

    async def _send(self, cmd: Command, answer: Answer, via: str) -> None:
        """The answer by the transport the command came by (HTTP when MQTT is down), retried
        until the command expires."""
        backoff = Backoff()
        while _utcnow() < cmd.expires_at:
            if via == "mqtt" and self.mqtt is not None and self.mqtt.connected:
                if await self.mqtt.publish_answer(cmd.command_id, answer.data, answer.error):
                    self._sent(cmd, answer, "mqtt")
                    return
            else:
                try:
                    if answer.error is not None:
                        await self.client.post_command_failure(cmd.command_id, answer.error)
                    else:
                        await self.client.post_command_answer(cmd.command_id, answer.data)
                    self._sent(cmd, answer, "http")
                    return
                except HttpStatusError as exc:
                    if 400 <= exc.status < 500:  # the control plane said no: sending again won't do
                        self.failed += 1
                        log.warning("answer to command %s refused: %s", cmd.command_id, exc)
                        return
                    log.info("answer to command %s: %s", cmd.command_id, exc)
                except TransportError as exc:
                    log.info("answer to command %s: %s", cmd.command_id, exc)
            await asyncio.sleep(backoff.next_delay())
        self.failed += 1
        log.warning("command %s expired before its answer could be sent", cmd.command_id)

    def _sent(self, cmd: Command, answer: Answer, via: str) -> None:
        self.answered += 1
        what = f"error {answer.error!r}" if answer.error else f"{len(answer.data)} bytes"
        log.info("answered command %s via %s: %s", cmd.command_id, via, what)
