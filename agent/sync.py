"""The desired-state sync: poll or take pushes, verify, merge with imports, hand over.

It owns the control plane's accepted list, the imported (pinned) versions and the expiry of the
desired state acted on. HTTP long-polls while MQTT is down; while it is up MQTT pushes
(`handle_desired`) and HTTP only checks now and then. The MQTT link reports its changes with
`link_changed`. An accepted document goes to the updater with `Updater.adopt`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from agent.client import ControlPlaneClient
from agent.config import AgentConfig
from agent.exceptions import TransportError
from agent.keyring import KeyRing
from agent.mqtt import MqttLink
from agent.storage.offline import imported
from agent.update.updater import Updater
from protocol.backoff import Backoff
from protocol.desired import DesiredModel, accept_desired
from protocol.exceptions import ProtocolError, SignatureError
from protocol.timeutil import format_time

log = logging.getLogger("modelfleet.agent")

POLL_FAILED = "desired state poll failed"


def _utcnow() -> datetime:
    return datetime.now(UTC)


class DesiredSync:
    """Where the desired state comes from, and what the agent last accepted."""

    def __init__(
        self,
        *,
        config: AgentConfig,
        agent_id: str,
        client: ControlPlaneClient,
        keyring: KeyRing,
        mqtt: MqttLink | None,
        updater: Updater,
        note_error: Callable[[str | None], None],
        last_error: Callable[[], str | None],
        on_polled: Callable[[], None],
        changed: Callable[[], None],
    ) -> None:
        self.config = config
        self.agent_id = agent_id
        self.client = client
        self.keyring = keyring
        self.updater = updater
        self.mqtt = mqtt
        self._note_error = note_error
        self._last_error = last_error
        self._on_polled = on_polled
        self._changed = changed
        self.from_control_plane: tuple[DesiredModel, ...] = ()
        self.pins: dict[str, dict[str, str]] = imported(config.state_dir)
        # Expiry of the desired state we act on: past it we keep serving but report "stale"
        # (a control plane, or someone between us, that stopped sending fresh documents).
        self.desired_expires_at: datetime | None = None
        # How the last adopted desired state came (mqtt, http): in its log line, and for tests.
        self.adopted_via: str | None = None
        self._link_changed = asyncio.Event()

    def link_changed(self) -> None:
        """The MQTT link dropped or came back: re-decide how to sync at once."""
        self._link_changed.set()

    def restore(self) -> None:
        """Resume the last accepted desired state (expired or not) after a restart."""
        envelope = self.updater.state.desired_envelope
        if envelope:
            try:
                ds = accept_desired(
                    envelope.encode(),
                    self.keyring.cp_keys,
                    self.agent_id,
                    0,
                    _utcnow(),
                    allow_expired=True,
                )
                if ds is not None:
                    self.from_control_plane = ds.models
                    self.desired_expires_at = ds.expires_at
            except ProtocolError as exc:
                log.warning("stored desired state not used: %s", exc)
        self.updater.want(self._merged())

    def reconfigure(self, config: AgentConfig) -> None:
        """Take a re-read configuration, and the imported versions again."""
        self.config = config
        self.pins = imported(config.state_dir)
        self.updater.want(self._merged())

    async def run(self) -> None:
        """Poll (long-poll while MQTT is down), and adopt what comes."""
        backoff = Backoff()
        while True:
            pushed = self.mqtt is not None and self.mqtt.connected
            if pushed:
                # MQTT pushes changes; HTTP only checks now and then, in case one was missed.
                self._link_changed.clear()
                try:
                    async with asyncio.timeout(self.config.poll_interval_s):
                        await self._link_changed.wait()
                    continue  # the link dropped (or came back): re-decide at once
                except TimeoutError:
                    pass
            try:
                envelope = await self.client.poll_desired(
                    self.updater.state.highest_generation,
                    0 if pushed else self.config.poll_wait_s,
                )
            except TransportError as exc:
                self._note_error(f"{POLL_FAILED}: {exc}")
                await asyncio.sleep(backoff.next_delay())
                continue
            backoff.reset()
            self._on_polled()
            if envelope is not None and not await self.handle_desired(envelope, via="http"):
                # A refused document would come straight back: do not spin on it.
                await asyncio.sleep(backoff.next_delay())
            elif (last := self._last_error()) and last.startswith(POLL_FAILED):
                self._note_error(None)

    async def handle_desired(self, envelope: bytes, *, via: str) -> bool:
        """Verify and adopt a desired-state envelope that came by ``via`` (``mqtt`` push or
        ``http`` poll); False (and reported) when refused."""
        generation = self.updater.state.highest_generation
        try:
            try:
                ds = accept_desired(
                    envelope, self.keyring.cp_keys, self.agent_id, generation, _utcnow()
                )
            except SignatureError:
                # Perhaps signed by a rotated control plane key that a newer key set lists.
                if not await self.keyring.refresh():
                    raise
                ds = accept_desired(
                    envelope,
                    self.keyring.cp_keys,
                    self.agent_id,
                    self.updater.state.highest_generation,
                    _utcnow(),
                )
        except ProtocolError as exc:
            self._note_error(f"refused desired state: {exc}")
            log.warning("refused desired state: %s", exc)
            return False
        if ds is None:
            return True
        log.info(
            "desired state generation %d by %s: %s",
            ds.generation,
            via,
            ", ".join(f"{m.name} {m.version}" for m in ds.models) or "nothing",
        )
        self.adopted_via = via
        self.keyring.look()  # publishers may have changed too: look before verifying
        self.from_control_plane = ds.models
        self.desired_expires_at = ds.expires_at
        await self.updater.adopt(self._merged(), generation=ds.generation, envelope=envelope)
        self._note_error(None)
        self._changed()
        return True

    def _merged(self) -> tuple[DesiredModel, ...]:
        """The control plane's list, plus imported versions of models it does not name."""
        named = {m.name for m in self.from_control_plane}
        pinned = tuple(
            DesiredModel(name, pin["version"], pin["manifestDigest"])
            for name, pin in sorted(self.pins.items())
            if name not in named
        )
        return self.from_control_plane + pinned

    def freshness(self) -> dict[str, Any]:
        """``desiredState``: none, current, or stale (expired, still served); and the expiry."""
        if self.desired_expires_at is None:
            return {"desiredState": "none"}
        state = "stale" if _utcnow() >= self.desired_expires_at else "current"
        return {"desiredState": state, "desiredExpiresAt": format_time(self.desired_expires_at)}
