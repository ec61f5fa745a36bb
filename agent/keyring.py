"""The key ring: which keys the agent trusts, and following the fleet's key set.

It holds the key set (when the fleet has one) and what it decides: the control plane keys
that sign desired states, the publisher keys (and how many must sign) that sign bundles.
Without a key set the keys from enrollment plus the configured publisher files are trusted.
Newer key set versions are followed now and then, and when a new generation may bring new
publishers; each must be signed by the root keys of the one before (protocol/keyset.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.client import ControlPlaneClient
from agent.config import AgentConfig
from agent.exceptions import TransportError
from agent.storage.state import StateDir
from agent.update.trust import verified_manifest
from protocol.desired import DesiredModel
from protocol.exceptions import ProtocolError
from protocol.keyset import follow_chain
from protocol.manifest import Manifest

log = logging.getLogger("modelfleet.agent")
KEYSET_WAIT_S = 5.0  # how long a manifest check waits for a key set look in progress


class KeyRing:
    """The trusted keys of one agent."""

    def __init__(
        self,
        *,
        dirs: StateDir,
        config: AgentConfig,
        client: ControlPlaneClient,
        on_refused: Callable[[str], None],
        on_changed: Callable[[], None],
    ) -> None:
        self.dirs = dirs
        self.client = client
        self._on_refused = on_refused  # a refused key set, for the status' lastError
        self._on_changed = on_changed  # a new key set version was accepted
        self.keyset = dirs.load_keyset()
        self.publishers: dict[str, Ed25519PublicKey] = {}
        self.publisher_threshold = 1
        self.cp_keys: dict[str, Ed25519PublicKey] = {}
        self.config = config
        self.reconfigure(config)
        self._lock = asyncio.Lock()
        self.task: asyncio.Task[int] | None = None  # a look started by a new generation

    def reconfigure(self, config: AgentConfig) -> None:
        """Which keys sign desired states and bundles: the key set's roles when the fleet has
        one, else the keys from enrollment plus the configured publisher files."""
        self.config = config
        self.publishers, self.publisher_threshold = self.dirs.publisher_trust(
            self.keyset, config.trusted_publisher_files
        )
        if self.keyset is None:
            self.cp_keys = self.dirs.control_plane_keys()
            return
        self.cp_keys = self.keyset.trusted("controlPlane")
        if config.trusted_publisher_files:
            log.warning(
                "key set version %d decides the trusted publishers: trust_publisher "
                "files are not used",
                self.keyset.version,
            )

    def verified_manifest(self, envelope: bytes, wanted: DesiredModel) -> Manifest:
        """The manifest of ``wanted`` in ``envelope``, signed by enough trusted publishers
        (agent/update/trust.py); raises UpdateError."""
        return verified_manifest(envelope, self.publishers, wanted, self.publisher_threshold)

    async def refresh(self) -> int:
        """Follow the key set versions after the one held; return how many were accepted.

        A refused one is reported and the held version stays.
        """
        async with self._lock:
            after = self.keyset.version if self.keyset else 0
            try:
                chain = await self.client.get_keyset_chain(after)
            except TransportError as exc:
                log.warning("key set not refreshed: %s", exc)  # the periodic look tries again
                return 0
            if not chain:
                return 0
            try:
                keyset, applied = follow_chain(self.keyset, chain, datetime.now(UTC))
            except ProtocolError as exc:
                self._on_refused(f"refused key set: {exc}")
                log.warning("refused key set: %s", exc)
                return 0
            await asyncio.to_thread(self.dirs.save_keyset, chain[-1])
            self.keyset = keyset
            self.reconfigure(self.config)
            log.info(
                "key set version %d accepted: %d publisher key(s), %d needed, %d control "
                "plane key(s)",
                keyset.version,
                len(self.publishers),
                self.publisher_threshold,
                len(self.cp_keys),
            )
            self._on_changed()
            return applied

    async def run(self) -> None:
        """Look for a newer key set now and then: a control plane key or a publisher removed
        from the key set is refused from the next look on."""
        while True:
            await self.refresh()
            await asyncio.sleep(self.config.keyset_refresh_s)

    def look(self) -> None:
        """Start a look for a newer key set (a new generation may come with new publishers)."""
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self.refresh(), name="agent-keyset")

    async def fresh(self) -> None:
        """Before a manifest is verified, wait a little for a look in progress to finish; with
        no HTTP route (MQTT only) the held key set is used after KEYSET_WAIT_S."""
        task = self.task
        if task is not None and not task.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), KEYSET_WAIT_S)
