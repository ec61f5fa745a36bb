"""The agent daemon: sync desired state, fetch and verify, activate, serve, report.

One async context manager owns every task (sync, reconcile, status, metrics) and the inference
server; leaving it stops accepting requests, drains, flushes metrics once, and disconnects.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from agent.buffer import MetricsBuffer
from agent.client import ControlPlaneClient
from agent.config import AgentConfig
from agent.exceptions import TransportError, UpdateError
from agent.facts import gather_facts
from agent.failpoints import Failpoints
from agent.keyring import KeyRing
from agent.metrics import MetricsRecorder
from agent.mqtt import MqttLink
from agent.offline import imported
from agent.reconciler import plan
from agent.report.outbox import MetricsOutbox
from agent.report.status import StatusReporter
from agent.runtime import LoadedModel
from agent.serving.app import start_serving
from agent.serving.prom import Gauges
from agent.serving.table import RolledBack, ServingTable
from agent.state import Identity, StateDir
from agent.store import LocalStore
from agent.systemd import Notifier
from agent.tls import client_context
from agent.update.disk import prune_plan
from agent.update.downgrade import downgrade_refusal
from agent.update.fetch import Fetcher
from agent.update.load import Loader
from protocol.backoff import Backoff
from protocol.desired import DesiredModel, accept_desired
from protocol.exceptions import ProtocolError, SignatureError
from protocol.keyset import KeySet
from protocol.reports import ModelStatus, StatusReport
from protocol.timeutil import format_time
from protocol.versions import compare_versions

log = logging.getLogger("modelfleet.agent")


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class Progress:
    """What the agent is doing with a desired version that is not serving yet."""

    state: str
    reason: str | None = None


class Agent:
    """One running agent."""

    def __init__(self, config: AgentConfig, notifier: Notifier | None = None) -> None:
        self.config = config
        self.notifier = notifier or Notifier({})
        self.started = time.monotonic()
        self.dirs = StateDir(config.state_dir)
        self.identity: Identity = self.dirs.load_identity()
        self.state = self.dirs.load_state()
        self.store = LocalStore(config.state_dir)
        self.buffer = MetricsBuffer(
            config.state_dir / "metrics-buffer.db", config.max_pending_batches
        )
        self.failpoints = Failpoints(config.failpoints)
        self.client = ControlPlaneClient(
            self.identity.server,
            self.identity.credential,
            self.identity.agent_id,
            client_context(config.ca_file, config.client_cert_file, config.client_key_file),
        )
        self.executor = ThreadPoolExecutor(config.inference_threads, "modelfleet-infer")
        self.desired: tuple[DesiredModel, ...] = ()
        self.from_control_plane: tuple[DesiredModel, ...] = ()
        self.pins: dict[str, dict[str, str]] = imported(config.state_dir)
        self.failed: dict[str, Progress] = {}  # manifest digest -> failed or refused, with reason
        self.progress: dict[str, Progress] = {}  # manifest digest -> what is happening to it
        self.last_error: str | None = None
        # Expiry of the desired state we act on: past it we keep serving but report "stale"
        # (a control plane, or someone between us, that stopped sending fresh documents).
        self.desired_expires_at: datetime | None = None
        self.facts = gather_facts()
        self.metrics = MetricsRecorder(_utcnow())
        self.serving = ServingTable(
            config=config,
            executor=self.executor,
            metrics=self.metrics,
            on_rolled_back=self._rolled_back,
        )
        self.counters: dict[str, float] = {
            "downloads": 0,
            "download_bytes": 0,
            "last_sync": 0,
            "pending_batches": 0,
            "dropped_batches": 0,
        }
        self.outbox = MetricsOutbox(
            agent_id=self.identity.agent_id,
            config=config,
            recorder=self.metrics,
            buffer=self.buffer,
            publish=self._publish,
            post=self.client.post_metrics,
            on_counts=self._metrics_counts,
        )
        self._reconcile_wake = asyncio.Event()
        self.reporter = StatusReporter(
            report=self.status_report,
            send=self._send_status,
            heartbeat_s=config.heartbeat_s,
            before_report=self._before_status,
        )
        self.keyring = KeyRing(
            dirs=self.dirs,
            config=config,
            client=self.client,
            on_refused=self._note_error,
            on_changed=self.reporter.changed,
        )
        self._state_dirty = False
        self._reconcile_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._runner: web.AppRunner | None = None
        self.serve_port: int | None = None
        self._transport_changed = asyncio.Event()
        self.mqtt = self._mqtt_link()
        self.loader = Loader(
            config=config,
            store=self.store,
            keyring=self.keyring,
            facts=self.facts,
            executor=self.executor,
        )
        self.fetcher = Fetcher(
            config=config,
            store=self.store,
            client=self.client,
            mqtt=self.mqtt,
            keyring=self.keyring,
            facts=self.facts,
            failpoints=self.failpoints,
            prune=self._prune,
            on_bytes=self._downloaded_bytes,
            on_blob=self._downloaded_blob,
        )

    @property
    def keyset(self) -> KeySet | None:
        """The key set held (the key ring's)."""
        return self.keyring.keyset

    @property
    def models(self) -> dict[str, LoadedModel]:
        """The versions serving now (the serving table's)."""
        return self.serving.models

    def gauges(self) -> Gauges:
        """The agent's counters now, for /metrics."""
        c = self.counters
        return Gauges(
            generation=self.state.highest_generation,
            downloads=c["downloads"],
            download_bytes=c["download_bytes"],
            last_sync=c["last_sync"],
            pending_batches=c["pending_batches"],
            dropped_batches=c["dropped_batches"],
        )

    def _mqtt_link(self) -> MqttLink | None:
        given = self.identity.mqtt or {}
        url = self.config.mqtt_url or given.get("url")
        if not url:
            return None

        def changed(connected: bool) -> None:
            self._transport_changed.set()
            self.reporter.changed()
            self.outbox.link_changed()

        return MqttLink(
            self.identity.agent_id,
            url,
            given.get("username"),
            given.get("password"),
            given.get("prefix", ""),
            self.handle_desired,
            changed,
            self.config.mqtt_ca_file,
            self.outbox.acked,
        )

    # ------------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Agent:
        await self.client.__aenter__()
        await self.reporter.open(self.dirs)
        await self._restore()
        self._runner, self.serve_port = await start_serving(self.serving, self.gauges)
        log.info(
            "agent %s serving on %s:%s",
            self.identity.agent_id,
            self.config.serve_host,
            self.serve_port,
        )
        loops = [
            ("sync", self._sync_loop()),
            ("reconcile", self._reconcile_loop()),
            ("status", self.reporter.run()),
            ("metrics", self.outbox.run()),
            ("keyset", self.keyring.run()),
        ]
        if self.notifier.watchdog_s:
            loops.append(("watchdog", self._watchdog_loop(self.notifier.watchdog_s)))
        if self.mqtt is not None:
            loops.append(("mqtt", self.mqtt.run()))
        for name, coro in loops:
            self._tasks.append(asyncio.create_task(coro, name=f"agent-{name}"))
        self.reporter.changed()
        return self

    async def __aexit__(self, *exc: object) -> None:
        # Order: stop taking requests and drain them (aiohttp waits up to drain_s), stop the
        # loops, flush metrics once, disconnect.
        if self._runner is not None:
            await self._runner.cleanup()
        if self.mqtt is not None:
            await self.mqtt.say_offline()
        tasks = [*self._tasks, *([self.keyring.task] if self.keyring.task else [])]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.outbox.drain(3)
        await self.client.__aexit__(None, None, None)
        self.executor.shutdown(wait=True, cancel_futures=True)
        self.buffer.close()

    async def _restore(self) -> None:
        """Serve what was active before a restart, and resume the last accepted desired state."""
        if self.state.desired_envelope:
            try:
                ds = accept_desired(
                    self.state.desired_envelope.encode(),
                    self.keyring.cp_keys,
                    self.identity.agent_id,
                    0,
                    _utcnow(),
                    allow_expired=True,
                )
                if ds is not None:
                    self.from_control_plane = ds.models
                    self.desired_expires_at = ds.expires_at
            except ProtocolError as exc:
                log.warning("stored desired state not used: %s", exc)
        self._merge_desired()
        for name, info in list(self.state.active.items()):
            wanted = DesiredModel(name, info["version"], info["manifestDigest"], rollback=True)
            try:
                self.serving.restore(await self.loader.load(wanted))
            except UpdateError as exc:
                log.error("could not restore %s %s: %s", name, wanted.version, exc)
                self.state.active.pop(name, None)
        self._reconcile_wake.set()

    # --------------------------------------------------------------------------- sync

    async def _sync_loop(self) -> None:
        backoff = Backoff()
        while True:
            pushed = self.mqtt is not None and self.mqtt.connected
            if pushed:
                # MQTT pushes changes; HTTP only checks now and then, in case one was missed.
                self._transport_changed.clear()
                try:
                    async with asyncio.timeout(self.config.poll_interval_s):
                        await self._transport_changed.wait()
                    continue  # the link dropped (or came back): re-decide at once
                except TimeoutError:
                    pass
            try:
                envelope = await self.client.poll_desired(
                    self.state.highest_generation, 0 if pushed else self.config.poll_wait_s
                )
            except TransportError as exc:
                self._note_error(f"desired state poll failed: {exc}")
                await asyncio.sleep(backoff.next_delay())
                continue
            backoff.reset()
            self.counters["last_sync"] = time.time()
            if envelope is not None and not await self.handle_desired(envelope):
                # A refused document would come straight back: do not spin on it.
                await asyncio.sleep(backoff.next_delay())
            elif self.last_error and self.last_error.startswith("desired state poll failed"):
                self._note_error(None)

    async def handle_desired(self, envelope: bytes) -> bool:
        """Verify and adopt a desired-state envelope; False (and reported) when refused."""
        try:
            try:
                ds = accept_desired(
                    envelope,
                    self.keyring.cp_keys,
                    self.identity.agent_id,
                    self.state.highest_generation,
                    _utcnow(),
                )
            except SignatureError:
                # Perhaps signed by a rotated control plane key that a newer key set lists.
                if not await self.keyring.refresh():
                    raise
                ds = accept_desired(
                    envelope,
                    self.keyring.cp_keys,
                    self.identity.agent_id,
                    self.state.highest_generation,
                    _utcnow(),
                )
        except ProtocolError as exc:
            self._note_error(f"refused desired state: {exc}")
            log.warning("refused desired state: %s", exc)
            return False
        if ds is None:
            return True
        log.info(
            "desired state generation %d: %s",
            ds.generation,
            ", ".join(f"{m.name} {m.version}" for m in ds.models) or "nothing",
        )
        self.failed.clear()  # a new desired state is the signal to try failed versions again
        self.progress.clear()
        self.keyring.look()  # publishers may have changed too: look before verifying
        self.from_control_plane = ds.models
        self.desired_expires_at = ds.expires_at
        self._merge_desired()
        self.state.highest_generation = ds.generation
        self.state.desired_envelope = envelope.decode()
        await asyncio.to_thread(self.dirs.save_state, self.state)
        self.last_error = None
        self._reconcile_wake.set()
        self.reporter.changed()
        return True

    def _merge_desired(self) -> None:
        """The control plane's list, plus imported versions of models it does not name."""
        named = {m.name for m in self.from_control_plane}
        pinned = tuple(
            DesiredModel(name, pin["version"], pin["manifestDigest"])
            for name, pin in sorted(self.pins.items())
            if name not in named
        )
        self.desired = self.from_control_plane + pinned
        self.serving.want(m.name for m in self.desired)

    def reload(self, config: AgentConfig) -> None:
        """Take a re-read configuration (SIGHUP); raises AgentConfigError for a bad one.

        Trusted keys, intervals, health and download settings change at once; the serve
        address and the state directory need a restart.
        """
        if (config.state_dir, config.serve_host, config.serve_port) != (
            self.config.state_dir,
            self.config.serve_host,
            self.config.serve_port,
        ):
            log.warning("serve address and state directory changes need a restart")
            old = self.config
            config = replace(
                config,
                state_dir=old.state_dir,
                serve_host=old.serve_host,
                serve_port=old.serve_port,
            )
        self.keyring.reconfigure(config)
        identity = self.dirs.load_identity()
        if identity.credential != self.identity.credential:
            # `agent rotate-credential` wrote a new one: use it (its first use retires the old).
            self.identity = identity
            self.client.set_credential(identity.credential)
            log.info("using the rotated credential")
        self.config = config
        self.serving.reconfigure(config)
        self.outbox.reconfigure(config)
        self.reporter.reconfigure(config.heartbeat_s)
        self.fetcher.reconfigure(config)
        self.loader.reconfigure(config)
        self.pins = imported(config.state_dir)
        self._merge_desired()
        self.failed.clear()
        log.info("configuration reloaded (%d trusted publisher keys)", len(self.keyring.publishers))
        self._reconcile_wake.set()
        self.reporter.changed()

    async def _watchdog_loop(self, interval_s: float) -> None:
        """Ping systemd at half its watchdog interval, from the event loop itself: a stuck loop
        stops the pings, and systemd restarts the agent."""
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval_s / 2)

    def _note_error(self, message: str | None) -> None:
        if message != self.last_error:
            self.last_error = message
            self.reporter.changed()

    # ---------------------------------------------------------------------- reconcile

    async def _reconcile_loop(self) -> None:
        backoff = Backoff(base=1.0, cap=60.0)
        incomplete = False
        while True:
            if incomplete:
                try:
                    async with asyncio.timeout(backoff.next_delay()):
                        await self._reconcile_wake.wait()
                except TimeoutError:
                    pass
            else:
                backoff.reset()
                await self._reconcile_wake.wait()
            self._reconcile_wake.clear()
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
                self.failed[m.manifest_digest] = Progress("refused", reason)

    async def reconcile(self) -> bool:
        """Run one plan to completion; True when something must be retried later."""
        async with self._reconcile_lock:
            self._check_rollback()
            running = self.serving.running()
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
                    await self._activate(m)
                    self.progress.pop(m.manifest_digest, None)
                    log.info("activated %s %s", m.name, m.version)
                except UpdateError as exc:
                    self._fail(m, str(exc))
            incomplete |= await self._reconcile_shadows()
            for name in p.unload:
                self.serving.unload(name)
                self.state.active.pop(name, None)
                self._state_dirty = True
                log.info("unloaded %s", name)
            if self._state_dirty:
                self._state_dirty = False
                await asyncio.to_thread(self.dirs.save_state, self.state)
            self.reporter.changed()
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
        self.progress[m.manifest_digest] = Progress(state, reason)
        self.reporter.changed()

    def _fail(self, m: DesiredModel, reason: str) -> None:
        log.error("%s %s failed: %s", m.name, m.version, reason)
        self.failed[m.manifest_digest] = Progress("failed", reason)
        self.progress[m.manifest_digest] = Progress("failed", reason)
        self.reporter.changed()

    async def _fetch_one(self, m: DesiredModel) -> str:
        """Fetch one version: "ok", "failed" (reported, not retried) or "retry" (link trouble)."""
        try:
            await self.fetcher.fetch(m)
            return "ok"
        except UpdateError as exc:
            self._fail(m, str(exc))
            return "failed"
        except TransportError as exc:
            self._set_progress(m, "downloading", f"retrying: {exc}")
            return "retry"

    async def _activate(self, m: DesiredModel) -> None:
        lm = await self.loader.load(m)
        self.failpoints.hit("model-loaded")
        self.serving.activate(lm)
        self.failpoints.hit("before-state-saved")
        self.state.active[m.name] = {
            "version": m.version,
            "manifestDigest": m.manifest_digest,
            "variant": lm.variant,
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

    def _downloaded_bytes(self, n: int) -> None:
        self.counters["download_bytes"] += n

    def _downloaded_blob(self) -> None:
        self.counters["downloads"] += 1

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

    # ------------------------------------------------------------------------ serving

    def _rolled_back(self, event: RolledBack) -> None:
        """The serving table rolled a version back: record it, and do not try it again."""
        new, prev = event.new, event.previous
        if prev is not None:
            self.state.active[new.name] = {
                "version": prev.version,
                "manifestDigest": prev.manifest_digest,
                "variant": prev.variant,
            }
        else:
            self.state.active.pop(new.name, None)
        log.error("%s %s: %s", new.name, new.version, event.reason)
        self.failed[new.manifest_digest] = Progress("failed", event.reason)
        self.progress[new.manifest_digest] = Progress("failed", event.reason)
        self._state_dirty = True
        self._reconcile_wake.set()  # persists the state
        self.reporter.changed()

    def ready(self) -> bool:
        """Every desired model has a version serving."""
        return self.serving.ready()

    # ------------------------------------------------------------------------ reports

    def desired_freshness(self) -> dict[str, Any]:
        """``desiredState``: none, current, or stale (expired, still served); and the expiry."""
        if self.desired_expires_at is None:
            return {"desiredState": "none"}
        state = "stale" if _utcnow() >= self.desired_expires_at else "current"
        return {"desiredState": state, "desiredExpiresAt": format_time(self.desired_expires_at)}

    def status_report(self) -> StatusReport:
        """The agent's status now, numbered after every report built before it (the
        reporter's (epoch, seq): agent/report/status.py)."""
        epoch, seq = self.reporter.next_number()
        models = [
            ModelStatus(lm.name, lm.version, lm.manifest_digest, "active", variant=lm.variant)
            for lm in self.serving.snapshot()
        ]
        for m in self.desired:
            running = self.serving.get(m.name)
            if running is not None and running.manifest_digest == m.manifest_digest:
                continue
            pr = self.failed.get(m.manifest_digest) or self.progress.get(m.manifest_digest)
            pr = pr or Progress("downloading")
            models.append(ModelStatus(m.name, m.version, m.manifest_digest, pr.state, pr.reason))
        facts: dict[str, Any] = {**self.facts, "servePort": self.serve_port}
        return StatusReport(
            agent_id=self.identity.agent_id,
            generation=self.state.highest_generation,
            sent_at=_utcnow(),
            models=tuple(models),
            facts=facts,
            last_error=self.last_error,
            extra={
                "metricsPending": int(self.counters["pending_batches"]),
                "metricsDropped": int(self.counters["dropped_batches"]),
                **self.desired_freshness(),
                "keysetVersion": keyset.version if (keyset := self.keyring.keyset) else None,
            },
            epoch=epoch,
            seq=seq,
        )

    def _before_status(self) -> None:
        now = time.monotonic()
        self.failpoints.stall("stall-event-loop", now - self.started)
        self.serving.end_passed_windows(now)

    async def _send_status(self, doc: dict[str, Any]) -> None:
        """Over MQTT when the link is up, else over HTTP; raises TransportError."""
        if not await self._publish("status", doc):
            await self.client.post_status(doc)

    async def _publish(self, kind: str, doc: dict[str, Any]) -> bool:
        """Publish a report over MQTT; False when there is no link to take it (use HTTP)."""
        return self.mqtt is not None and await self.mqtt.publish(kind, doc)

    def _metrics_counts(self, pending: int, dropped: int) -> None:
        self.counters["pending_batches"] = pending
        self.counters["dropped_batches"] = dropped

    @property
    def _sent_over_mqtt(self) -> dict[int, float]:
        # Read by tests/integration/test_mqtt.py's failure message: the outbox's in-flight seqs.
        return self.outbox.in_flight
