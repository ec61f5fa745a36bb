"""The updater: brings the serving table to the desired versions, and records what it did.

It owns the agent's state file (the active versions, the highest versions, the history), the
failed and progress records, and the reconcile loop: plan (agent/update/plan.py), fetch
(agent/update/fetch.py), load and activate (agent/update/load.py), shadows, unload, prune. The
sync hands it a desired state with `adopt` or `want`; anything else asks for a pass with
`wake`. A roll back by the serving table arrives as `rolled_back`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from agent.client import ControlPlaneClient
from agent.config import AgentConfig
from agent.exceptions import TransportError, UpdateError
from agent.host.failpoints import Failpoints
from agent.keyring import KeyRing
from agent.mqtt import MqttLink
from agent.serving.table import RolledBack, ServingTable
from agent.storage.blobs import LocalStore
from agent.storage.state import PersistentState, StateDir
from agent.telemetry import OFF, Telemetry
from agent.update.config import config_of, configure, serving_key
from agent.update.disk import prune_plan
from agent.update.downgrade import downgrade_refusal
from agent.update.fetch import Fetcher
from agent.update.load import Loader
from agent.update.plan import plan
from protocol.backoff import Backoff
from protocol.desired import DesiredModel
from protocol.reports import ModelStatus
from protocol.versions import compare_versions

log = logging.getLogger("modelfleet.agent")


@dataclass
class Progress:
    """What the agent is doing with a desired version that is not serving yet."""

    state: str
    reason: str | None = None


def _about(m: DesiredModel) -> dict[str, str]:
    """A desired version's attributes on its update spans."""
    return {
        "modelfleet.model": m.name,
        "modelfleet.version": m.version,
        "modelfleet.manifest_digest": m.manifest_digest,
    }


class Updater:
    """The desired versions, what became of each, and the loop that gets them serving."""

    def __init__(
        self,
        *,
        config: AgentConfig,
        dirs: StateDir,
        store: LocalStore,
        serving: ServingTable,
        keyring: KeyRing,
        client: ControlPlaneClient,
        mqtt: MqttLink | None,
        facts: dict[str, Any],
        failpoints: Failpoints,
        executor: ThreadPoolExecutor,
        on_bytes: Callable[[int], None],
        on_blob: Callable[[], None],
        note_error: Callable[[str | None], None],
        changed: Callable[[], None],
        telemetry: Telemetry = OFF,
    ) -> None:
        self.config = config
        self.telemetry = telemetry
        self.dirs = dirs
        self.state: PersistentState = dirs.load_state()
        self.store = store
        self.serving = serving
        self.failpoints = failpoints
        self._note_error = note_error
        self._changed = changed
        self.desired: tuple[DesiredModel, ...] = ()
        # Keyed by serving key: the manifest digest, plus the configuration's digest if any.
        self.failed: dict[str, Progress] = {}  # serving key -> failed or refused, with reason
        self.progress: dict[str, Progress] = {}  # serving key -> what is happening to it
        self._wake = asyncio.Event()
        self._unsaved = False  # the state changed outside a pass (a roll back): save it next
        self._lock = asyncio.Lock()
        self.loader = Loader(
            config=config,
            store=store,
            keyring=keyring,
            facts=facts,
            executor=executor,
            held=serving.held_digests,
            telemetry=telemetry,
        )
        self.fetcher = Fetcher(
            config=config,
            store=store,
            client=client,
            mqtt=mqtt,
            keyring=keyring,
            facts=facts,
            failpoints=failpoints,
            prune=self._prune,
            on_bytes=on_bytes,
            on_blob=on_blob,
        )

    # ------------------------------------------------------------------ what others call

    def want(self, desired: tuple[DesiredModel, ...]) -> None:
        """Take the desired versions (the sync's merged list); the serving table learns the
        names it should have."""
        self.desired = desired
        self.serving.want(m.name for m in desired)

    async def adopt(
        self, desired: tuple[DesiredModel, ...], *, generation: int, envelope: bytes
    ) -> None:
        """Take a newly accepted desired state: failed versions are tried again, the
        generation and the envelope are saved, and a pass starts."""
        self.failed.clear()  # a new desired state is the signal to try failed versions again
        self.progress.clear()
        self.want(desired)
        self.state.highest_generation = generation
        self.state.desired_envelope = envelope.decode()
        await asyncio.to_thread(self.dirs.save_state, self.state)
        self.wake()

    def wake(self) -> None:
        """Ask for a reconcile pass."""
        self._wake.set()

    def reconfigure(self, config: AgentConfig) -> None:
        """Take a re-read configuration; failed versions are tried again."""
        self.config = config
        self.fetcher.reconfigure(config)
        self.loader.reconfigure(config)
        self.failed.clear()

    def rolled_back(self, event: RolledBack) -> None:
        """The serving table rolled a version back: record it, and do not try it again."""
        new, prev = event.new, event.previous
        if prev is not None:
            self.state.active[new.name] = {
                "version": prev.version,
                "manifestDigest": prev.manifest_digest,
                "variant": prev.variant,
                "config": config_of(prev),
            }
        else:
            self.state.active.pop(new.name, None)
        log.error("%s %s: %s", new.name, new.version, event.reason)
        self.telemetry.update_outcome(new.name, new.version, "rolled_back")
        self.failed[serving_key(new)] = Progress("failed", event.reason)
        self.progress[serving_key(new)] = Progress("failed", event.reason)
        self._unsaved = True
        self.wake()  # persists the state
        self._changed()

    def model_statuses(self) -> list[ModelStatus]:
        """The desired versions not serving yet, with what is happening to each."""
        models = []
        for m in self.desired:
            running = self.serving.get(m.name)
            if running is not None and serving_key(running) == m.serving_key:
                continue
            pr = self.failed.get(m.serving_key) or self.progress.get(m.serving_key)
            pr = pr or Progress("downloading")
            models.append(
                ModelStatus(
                    m.name,
                    m.version,
                    m.manifest_digest,
                    pr.state,
                    pr.reason,
                    config_digest=m.config_digest,
                )
            )
        return models

    async def restore(self) -> None:
        """Serve what was active before a restart, then start a pass."""
        for name, info in list(self.state.active.items()):
            wanted = DesiredModel(name, info["version"], info["manifestDigest"], rollback=True)
            try:
                lm = await self.loader.load(wanted)
                try:
                    lm = configure(lm, info.get("config"))
                except UpdateError as exc:  # kept by an older agent: serve as loaded
                    log.error("could not restore %s's configuration: %s", name, exc)
                self.serving.restore(lm)
            except UpdateError as exc:
                log.error("could not restore %s %s: %s", name, wanted.version, exc)
                self.state.active.pop(name, None)
        self.wake()

    # ------------------------------------------------------------------------- the loop

    async def run(self) -> None:
        """Reconcile whenever woken; retry an incomplete pass with back-off."""
        backoff = Backoff(base=1.0, cap=60.0)
        incomplete = False
        while True:
            if incomplete:
                try:
                    async with asyncio.timeout(backoff.next_delay()):
                        await self._wake.wait()
                except TimeoutError:
                    pass
            else:
                backoff.reset()
                await self._wake.wait()
            self._wake.clear()
            try:
                incomplete = await self.reconcile()
            except Exception as exc:
                # The loop's boundary: an unexpected failure (a state file that cannot be
                # written, say) is reported and retried with back-off; serving goes on.
                log.exception("reconcile failed")
                self._note_error(f"update step failed: {exc}")
                incomplete = True

    def _installed(self) -> set[str]:
        return {
            m.manifest_digest
            for m in self.desired
            if self.store.load_manifest(m.manifest_digest) is not None
        }

    def _check_rollback(self) -> None:
        """Refuse a version below the highest activated, unless the control plane ordered it."""
        running = self.serving.running()
        for m in self.desired:
            reason = downgrade_refusal(
                m.version,
                self.state.highest_versions.get(m.name),
                ordered=m.rollback,
                serving=running.get(m.name) == m.manifest_digest,
            )
            if reason is not None:
                if m.serving_key not in self.failed:
                    self.telemetry.update_outcome(m.name, m.version, "refused")
                self.failed[m.serving_key] = Progress("refused", reason)

    async def reconcile(self) -> bool:
        """Run one plan to completion; True when something must be retried later."""
        async with self._lock:
            self._check_rollback()
            running = {lm.name: serving_key(lm) for lm in self.serving.snapshot()}
            failed = {d: p.reason or p.state for d, p in self.failed.items()}
            p = plan(self.desired, await asyncio.to_thread(self._installed), running, failed)
            for m in p.fetch:
                self._set_progress(m, "downloading")
            results = await asyncio.gather(*(self._fetch_one(m) for m in p.fetch))
            incomplete = any(r == "retry" for r in results)
            fetched_ok = {
                m.manifest_digest for m, r in zip(p.fetch, results, strict=True) if r == "ok"
            }
            fetched = {m.manifest_digest for m in p.fetch}
            for m in p.activate:
                if m.manifest_digest in fetched and m.manifest_digest not in fetched_ok:
                    continue
                self._set_progress(m, "loading")
                try:
                    with self.telemetry.span(
                        "update.activate", parent=m.traceparent, root=True, attributes=_about(m)
                    ):
                        await self._activate(m)
                    self.progress.pop(m.serving_key, None)
                    self.telemetry.update_outcome(m.name, m.version, "activated")
                    log.info("activated %s %s", m.name, m.version)
                except UpdateError as exc:
                    self._fail(m, str(exc))
            incomplete |= await self._reconcile_shadows()
            for name in p.unload:
                self.serving.unload(name)
                self.state.active.pop(name, None)
                self._unsaved = True
                log.info("unloaded %s", name)
            if self._unsaved:
                self._unsaved = False
                await asyncio.to_thread(self.dirs.save_state, self.state)
            self._changed()
            return incomplete

    async def _reconcile_shadows(self) -> bool:
        """Keep the version each shadow-scoring rollout replaces loaded beside the live one."""
        incomplete = False
        wanted = {m.name: m for m in self.desired if m.shadow is not None}
        for name, digest in self.serving.shadowed().items():
            w = wanted.get(name)
            if w is None or w.shadow is None or digest != w.shadow.manifest_digest:
                self.serving.drop_shadow(name)
        shadowed = self.serving.shadowed()
        for name, m in wanted.items():
            assert m.shadow is not None
            if name in shadowed or m.shadow.manifest_digest in self.failed:
                continue
            old = DesiredModel(name, m.shadow.version, m.shadow.manifest_digest, rollback=True)
            try:
                if self.store.load_manifest(old.manifest_digest) is None:
                    await self.fetcher.fetch(old)
                self.serving.set_shadow(name, await self.loader.load(old), m.shadow.sample)
                log.info("shadow-scoring %s %s against %s", name, m.version, old.version)
            except UpdateError as exc:
                log.warning("shadow %s %s unavailable: %s", name, old.version, exc)
                self.failed[old.manifest_digest] = Progress("failed", str(exc))
            except TransportError:
                incomplete = True
        return incomplete

    def _set_progress(self, m: DesiredModel, state: str, reason: str | None = None) -> None:
        self.progress[m.serving_key] = Progress(state, reason)
        self._changed()

    def _fail(self, m: DesiredModel, reason: str) -> None:
        log.error("%s %s failed: %s", m.name, m.version, reason)
        self.telemetry.update_outcome(m.name, m.version, "failed")
        self.failed[m.serving_key] = Progress("failed", reason)
        self.progress[m.serving_key] = Progress("failed", reason)
        self._changed()

    async def _fetch_one(self, m: DesiredModel) -> str:
        """Fetch one version: "ok", "failed" (reported, not retried) or "retry" (link trouble)."""
        try:
            with self.telemetry.span(
                "update.fetch", parent=m.traceparent, root=True, attributes=_about(m)
            ):
                await self.fetcher.fetch(m)
            return "ok"
        except UpdateError as exc:
            self._fail(m, str(exc))
            return "failed"
        except TransportError as exc:
            self._set_progress(m, "downloading", f"retrying: {exc}")
            return "retry"

    async def _activate(self, m: DesiredModel) -> None:
        current = self.serving.get(m.name)
        if current is not None and current.manifest_digest == m.manifest_digest:
            # The same version under another configuration: nothing is loaded again; the
            # version goes through the health window as a new one would.
            lm = configure(current, m.config)
            log.info("%s %s: configuration %s", m.name, m.version, m.config_digest)
        else:
            lm = configure(await self.loader.load(m), m.config)
        self.failpoints.hit("model-loaded")
        self.serving.activate(lm)
        self.failpoints.hit("before-state-saved")
        self.state.active[m.name] = {
            "version": m.version,
            "manifestDigest": m.manifest_digest,
            "variant": lm.variant,
            "config": m.config,
        }
        highest = self.state.highest_versions.get(m.name)
        if highest is None or compare_versions(m.version, highest) > 0 or m.rollback:
            self.state.highest_versions[m.name] = m.version
        history = self.state.history.setdefault(m.name, [])
        if m.manifest_digest in history:
            history.remove(m.manifest_digest)
        history.insert(0, m.manifest_digest)
        await asyncio.to_thread(self.dirs.save_state, self.state)
        await asyncio.to_thread(self._prune)

    def _prune(self) -> None:
        """Keep, per model, the active version and ``keep_versions`` before it; drop the rest."""
        p = prune_plan(
            desired=self.desired,
            held=self.serving.held_digests(),
            history=self.state.history,
            keep_versions=self.config.keep_versions,
        )
        for name, history in p.history.items():
            self.state.history[name][:] = history
        removed = self.store.prune(set(p.keep))
        if removed:
            log.info("pruned %d old version(s) from disk", removed)
