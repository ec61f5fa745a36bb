"""Fetching a version: its manifest, then its blobs (resumed, rate limited), within the disk.

The manifest is verified by the key ring before any blob is fetched; blobs go to ``partial/``
and count as stored when their digest matches; the version counts as installed only when its
manifest envelope is written after all its blobs. Over HTTP or MQTT (agent/transport.py); a
version that would not fit the disk or its budget (agent/update/disk.py) is refused before
any byte is fetched.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import shutil
from collections.abc import Awaitable, Callable
from typing import Any

from agent.client import ControlPlaneClient
from agent.config import AgentConfig
from agent.exceptions import HttpStatusError, TransportError, UpdateError
from agent.host.failpoints import Failpoints
from agent.keyring import KeyRing
from agent.mqtt import MqttLink
from agent.storage.blobs import LocalStore
from agent.transport import NoRoute, Route, falls_back, first_route
from agent.update.disk import room_for
from agent.update.ratelimit import TokenBucket
from agent.update.variants import choose_variant
from protocol.backoff import Backoff
from protocol.desired import DesiredModel
from protocol.manifest import FileEntry

log = logging.getLogger("modelfleet.agent")


class Fetcher:
    """Brings versions onto the disk."""

    def __init__(
        self,
        *,
        config: AgentConfig,
        store: LocalStore,
        client: ControlPlaneClient,
        mqtt: MqttLink | None,
        keyring: KeyRing,
        facts: dict[str, Any],
        failpoints: Failpoints,
        prune: Callable[[], None],
        on_bytes: Callable[[int], None],
        on_blob: Callable[[], None],
    ) -> None:
        self.store = store
        self.client = client
        self.mqtt = mqtt
        self.facts = facts
        self.failpoints = failpoints
        self._keyring = keyring
        self._prune = prune  # drop old versions (in a worker thread) to make room
        self._on_bytes = on_bytes  # bytes received for blobs
        self._on_blob = on_blob  # a blob downloaded and verified
        self._download_slots = asyncio.Semaphore(config.max_concurrent_downloads)
        self.reconfigure(config)

    def reconfigure(self, config: AgentConfig) -> None:
        """Take a reloaded config: the rate limit, deadlines and transport change at once (the
        number of concurrent downloads needs a restart)."""
        self.config = config
        rate = config.max_download_rate
        self._limiter = TokenBucket(rate) if rate else None

    async def _over(
        self, http: Callable[[], Awaitable[Any]], mqtt: Callable[[], Awaitable[Any]]
    ) -> Any:
        """Run a fetch over the configured bundle transport (auto: HTTP, then MQTT)."""
        mode = self.config.bundle_transport
        try:
            route = first_route(mode, broker=self.mqtt is not None)
        except NoRoute as exc:
            raise UpdateError(str(exc)) from None
        if route is Route.MQTT:
            return await mqtt()
        try:
            return await http()
        except TransportError as exc:
            connected = self.mqtt is not None and self.mqtt.connected
            answered = isinstance(exc, HttpStatusError)
            if falls_back(mode, http_answered=answered, broker_connected=connected):
                log.info("control plane unreachable over HTTP: fetching over MQTT")
                return await mqtt()
            raise

    async def fetch(self, m: DesiredModel) -> None:
        """Fetch, verify and store one version; raises UpdateError (refused: not retried) or
        TransportError (link trouble: retried later)."""
        envelope = await self._over(
            lambda: self.client.get_manifest(m.manifest_digest),
            lambda: self.mqtt.fetch_manifest(m.manifest_digest),  # type: ignore[union-attr]
        )
        await self._keyring.fresh()
        manifest = self._keyring.verified_manifest(envelope, m)
        variant = choose_variant(manifest, self.facts)
        files = list(manifest.files_for(variant))
        await self._ensure_room(files)
        try:
            await asyncio.gather(*(self._download(f) for f in files))
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            # The disk filled up under us (something else wrote to it): give back what this
            # version took and say so; the running version is untouched.
            for f in files:
                await asyncio.to_thread(self.store.partial_path(f.digest).unlink, True)
            raise UpdateError(
                f"disk full while downloading {m.name} {m.version}: {exc.strerror}; "
                "the partial download was removed"
            ) from None
        self.failpoints.hit("before-manifest-saved")
        await asyncio.to_thread(self.store.save_manifest, m.manifest_digest, envelope)

    async def _ensure_room(self, files: list[FileEntry]) -> None:
        """Refuse a version that would not fit the disk or the budget, after pruning."""
        needed = sum(f.size for f in files if not self.store.has_blob(f.digest))
        if not needed:
            return
        free = (await asyncio.to_thread(shutil.disk_usage, self.config.state_dir)).free
        budget = self.config.disk_budget_bytes
        used = 0 if budget is None else await asyncio.to_thread(self.store.used_bytes)
        room = room_for(needed=needed, free=free, used=used, budget=budget, pruned=False)
        if room.prune:
            await asyncio.to_thread(self._prune)
            used = await asyncio.to_thread(self.store.used_bytes)
            room = room_for(needed=needed, free=free, used=used, budget=budget, pruned=True)
        if room.reason is not None:
            raise UpdateError(room.reason)

    async def _download(self, f: FileEntry) -> None:
        if await asyncio.to_thread(self.store.has_blob, f.digest):
            return
        async with self._download_slots:
            backoff = Backoff(base=0.2, cap=5.0)
            half_reported = False

            async def on_chunk(n: int, have: int) -> None:
                nonlocal half_reported
                self._on_bytes(n)
                if self._limiter is not None:
                    await self._limiter.consume(n)
                if not half_reported and have * 2 >= f.size:
                    half_reported = True
                    self.failpoints.hit("download-midway")

            # A server that trickles bytes (slow retrieval) must not hold the update forever.
            deadline = self.config.download_grace_s + f.size / self.config.download_min_rate
            for attempt in range(1, self.config.download_attempts + 1):
                try:
                    part = self.store.partial_path(f.digest)
                    try:
                        async with asyncio.timeout(deadline):
                            await self._over(
                                lambda part=part: self.client.download_blob(
                                    f.digest, f.size, part, on_chunk
                                ),
                                lambda part=part, link=self.mqtt: link.fetch_blob(  # type: ignore[union-attr]
                                    f.digest, f.size, part, on_chunk
                                ),
                            )
                    except TimeoutError:
                        raise TransportError(
                            f"blob {f.digest}: slower than {self.config.download_min_rate:.0f} "
                            f"bytes/s on average (deadline {deadline:.0f}s)"
                        ) from None
                    break
                except HttpStatusError as exc:
                    if 400 <= exc.status < 500:
                        raise UpdateError(
                            f"blob {f.digest} of {f.path!r}: HTTP {exc.status}"
                        ) from None
                    if attempt == self.config.download_attempts:
                        raise
                except TransportError as exc:
                    if attempt == self.config.download_attempts:
                        raise
                    log.info("download of %s cut (%s); resuming", f.path, exc)
                await asyncio.sleep(backoff.next_delay())
            try:
                await asyncio.to_thread(self.store.commit_partial, f.digest, f.size)
            except ValueError as exc:
                raise UpdateError(f"file {f.path!r}: {exc}") from None
            self._on_blob()
            self.failpoints.hit("blob-committed")
