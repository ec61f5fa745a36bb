"""The agent daemon: sync desired state, fetch and verify, activate, serve, report.

One async context manager owns every task (sync, reconcile, status, metrics) and the inference
server; leaving it stops accepting requests, drains, flushes metrics once, and disconnects.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
from aiohttp import web

from agent.backoff import Backoff
from agent.client import ControlPlaneClient
from agent.config import AgentConfig
from agent.exceptions import HttpStatusError, TransportError, UpdateError
from agent.facts import gather_facts
from agent.metrics import MetricsRecorder
from agent.reconciler import plan
from agent.runtime import LoadedModel, check_feeds, load_model, run_smoke_test
from agent.state import Identity, StateDir
from agent.store import LocalStore
from agent.trust import verified_manifest
from protocol.desired import DesiredModel, accept_desired
from protocol.exceptions import ProtocolError
from protocol.reports import MetricsBatch, ModelStatus, StatusReport

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

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.dirs = StateDir(config.state_dir)
        self.identity: Identity = self.dirs.load_identity()
        self.cp_keys = self.dirs.control_plane_keys()
        self.publishers = self.dirs.trusted_publishers(config.trusted_publisher_files)
        self.state = self.dirs.load_state()
        self.store = LocalStore(config.state_dir)
        self.client = ControlPlaneClient(
            self.identity.server, self.identity.credential, self.identity.agent_id
        )
        self.executor = ThreadPoolExecutor(config.inference_threads, "modelfleet-infer")
        self.models: dict[str, LoadedModel] = {}
        self.desired: tuple[DesiredModel, ...] = ()
        self.failed: dict[str, str] = {}
        self.progress: dict[str, Progress] = {}
        self.last_error: str | None = None
        self.facts = gather_facts()
        self.metrics = MetricsRecorder(self.identity.agent_id, self.state.next_seq, _utcnow())
        self.pending_batches: list[MetricsBatch] = []
        self._reconcile_wake = asyncio.Event()
        self._status_dirty = asyncio.Event()
        self._reconcile_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._runner: web.AppRunner | None = None
        self.serve_port: int | None = None

    # ------------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Agent:
        await self.client.__aenter__()
        await self._restore()
        from agent.serve import create_serve_app

        self._runner = web.AppRunner(
            create_serve_app(self), access_log=None, shutdown_timeout=self.config.drain_s
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.serve_host, self.config.serve_port)
        await site.start()
        server = site._server
        assert server is not None
        self.serve_port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        log.info(
            "agent %s serving on %s:%s",
            self.identity.agent_id,
            self.config.serve_host,
            self.serve_port,
        )
        for name, coro in (
            ("sync", self._sync_loop()),
            ("reconcile", self._reconcile_loop()),
            ("status", self._status_loop()),
            ("metrics", self._metrics_loop()),
        ):
            self._tasks.append(asyncio.create_task(coro, name=f"agent-{name}"))
        self._status_dirty.set()
        return self

    async def __aexit__(self, *exc: object) -> None:
        # Order: stop taking requests and drain them, stop the loops, flush, disconnect.
        if self._runner is not None:
            # aiohttp stops listening, then waits up to drain_s for in-flight requests.
            await self._runner.cleanup()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            async with asyncio.timeout(3):
                await self._flush_metrics(final=True)
        except (TimeoutError, TransportError):
            log.warning("could not flush %d metrics batch(es) on exit", len(self.pending_batches))
        await self.client.__aexit__(None, None, None)
        self.executor.shutdown(wait=True, cancel_futures=True)

    async def _restore(self) -> None:
        """Serve what was active before a restart, and resume the last accepted desired state."""
        if self.state.desired_envelope:
            try:
                ds = accept_desired(
                    self.state.desired_envelope.encode(),
                    self.cp_keys,
                    self.identity.agent_id,
                    0,
                    _utcnow(),
                )
                if ds is not None:
                    self.desired = ds.models
            except ProtocolError as exc:
                log.warning("stored desired state not used: %s", exc)
        for name, info in list(self.state.active.items()):
            wanted = DesiredModel(name, info["version"], info["manifestDigest"])
            try:
                await self._activate(wanted, persist=False)
            except UpdateError as exc:
                log.error("could not restore %s %s: %s", name, wanted.version, exc)
                self.state.active.pop(name, None)
        self._reconcile_wake.set()

    # --------------------------------------------------------------------------- sync

    async def _sync_loop(self) -> None:
        backoff = Backoff()
        while True:
            try:
                envelope = await self.client.poll_desired(
                    self.state.highest_generation, self.config.poll_wait_s
                )
            except TransportError as exc:
                self._note_error(f"desired state poll failed: {exc}")
                await asyncio.sleep(backoff.next_delay())
                continue
            backoff.reset()
            if envelope is not None and not await self.handle_desired(envelope):
                # A refused document would come straight back: do not spin on it.
                await asyncio.sleep(backoff.next_delay())

    async def handle_desired(self, envelope: bytes) -> bool:
        """Verify and adopt a desired-state envelope; False (and reported) when refused."""
        try:
            ds = accept_desired(
                envelope,
                self.cp_keys,
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
        self.desired = ds.models
        self.state.highest_generation = ds.generation
        self.state.desired_envelope = envelope.decode()
        await asyncio.to_thread(self.dirs.save_state, self.state)
        self.last_error = None
        self._reconcile_wake.set()
        self._status_dirty.set()
        return True

    def _note_error(self, message: str) -> None:
        if message != self.last_error:
            self.last_error = message
            self._status_dirty.set()

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
            incomplete = await self.reconcile()

    def _installed(self) -> set[str]:
        return {
            m.manifest_digest
            for m in self.desired
            if self.store.load_manifest(m.manifest_digest) is not None
        }

    async def reconcile(self) -> bool:
        """Run one plan to completion; True when something must be retried later."""
        async with self._reconcile_lock:
            running = {n: m.manifest_digest for n, m in self.models.items()}
            p = plan(self.desired, await asyncio.to_thread(self._installed), running, self.failed)
            incomplete = False
            fetched_ok: set[str] = set()
            for m in p.fetch:
                self._set_progress(m, "downloading")
                try:
                    await self._fetch(m)
                    fetched_ok.add(m.manifest_digest)
                except UpdateError as exc:
                    self._fail(m, str(exc))
                except TransportError as exc:
                    self._set_progress(m, "downloading", f"retrying: {exc}")
                    incomplete = True
            fetched = {m.manifest_digest for m in p.fetch}
            for m in p.activate:
                if m.manifest_digest in fetched and m.manifest_digest not in fetched_ok:
                    continue
                self._set_progress(m, "loading")
                try:
                    await self._activate(m)
                    self.progress.pop(m.name, None)
                    log.info("activated %s %s", m.name, m.version)
                except UpdateError as exc:
                    self._fail(m, str(exc))
            for name in p.unload:
                self.models.pop(name, None)
                self.state.active.pop(name, None)
                self.progress.pop(name, None)
                log.info("unloaded %s", name)
            if p.unload:
                await asyncio.to_thread(self.dirs.save_state, self.state)
            self._status_dirty.set()
            return incomplete

    def _set_progress(self, m: DesiredModel, state: str, reason: str | None = None) -> None:
        self.progress[m.name] = Progress(state, reason)
        self._status_dirty.set()

    def _fail(self, m: DesiredModel, reason: str) -> None:
        log.error("%s %s failed: %s", m.name, m.version, reason)
        self.failed[m.manifest_digest] = reason
        self.progress[m.name] = Progress("failed", reason)
        self._status_dirty.set()

    async def _fetch(self, m: DesiredModel) -> None:
        envelope = await self.client.get_manifest(m.manifest_digest)
        manifest = verified_manifest(envelope, self.publishers, m)
        for f in manifest.files:
            if await asyncio.to_thread(self.store.has_blob, f.digest):
                continue
            try:
                await self.client.download_blob(f.digest, f.size, self.store.partial_path(f.digest))
            except HttpStatusError as exc:
                if exc.status in (404, 410):
                    raise UpdateError(
                        f"blob {f.digest} of {f.path!r} is not on the server"
                    ) from None
                raise
            try:
                await asyncio.to_thread(self.store.commit_partial, f.digest, f.size)
            except ValueError as exc:
                raise UpdateError(f"file {f.path!r}: {exc}") from None
        await asyncio.to_thread(self.store.save_manifest, m.manifest_digest, envelope)

    async def _activate(self, m: DesiredModel, persist: bool = True) -> None:
        envelope = await asyncio.to_thread(self.store.load_manifest, m.manifest_digest)
        if envelope is None:
            raise UpdateError(f"{m.name} {m.version} is not installed")
        manifest = verified_manifest(envelope, self.publishers, m)
        for f in manifest.files:
            if not await asyncio.to_thread(self.store.verify_blob, f.digest, f.size):
                raise UpdateError(f"stored file {f.path!r} is missing or corrupt")
        loop = asyncio.get_running_loop()
        model_path = self.store.blob_path(manifest.model_file().digest)
        runtime = await loop.run_in_executor(self.executor, load_model, manifest, model_path)
        if manifest.smoke_test is not None:
            st = manifest.smoke_test
            inp = self.store.blob_path(manifest.file(st.input_path).digest).read_bytes()
            out = self.store.blob_path(manifest.file(st.output_path).digest).read_bytes()
            await loop.run_in_executor(
                self.executor, run_smoke_test, runtime, inp, out, st.atol, st.rtol
            )
        # The swap: one assignment, so a request sees the old or the new version, never neither.
        self.models[m.name] = LoadedModel(m.name, m.version, m.manifest_digest, runtime)
        if persist:
            self.state.active[m.name] = {"version": m.version, "manifestDigest": m.manifest_digest}
            await asyncio.to_thread(self.dirs.save_state, self.state)

    # ------------------------------------------------------------------------ serving

    async def infer(
        self, name: str, feeds: dict[str, np.ndarray]
    ) -> tuple[LoadedModel, dict[str, np.ndarray]]:
        """Run one inference on the serving version; raises KeyError for an unknown model,
        InferenceInputError for bad input, and the runtime's error when inference fails."""
        lm = self.models[name]
        check_feeds(lm.runtime, feeds)
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        try:
            out = await loop.run_in_executor(self.executor, lm.runtime.run, feeds)
        except Exception:
            self.metrics.record(name, lm.version, (time.perf_counter() - t0) * 1000, True)
            raise
        self.metrics.record(name, lm.version, (time.perf_counter() - t0) * 1000, False)
        return lm, out

    def ready(self) -> bool:
        """Every desired model has a version serving."""
        return all(m.name in self.models for m in self.desired)

    # ------------------------------------------------------------------------ reports

    def status_report(self) -> StatusReport:
        """The agent's status now."""
        models = [
            ModelStatus(lm.name, lm.version, lm.manifest_digest, "active")
            for lm in sorted(self.models.values(), key=lambda x: x.name)
        ]
        for m in self.desired:
            running = self.models.get(m.name)
            if running is not None and running.manifest_digest == m.manifest_digest:
                continue
            pr = self.progress.get(m.name)
            if m.manifest_digest in self.failed:
                pr = Progress("failed", self.failed[m.manifest_digest])
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
        )

    async def _status_loop(self) -> None:
        backoff = Backoff()
        while True:
            try:
                async with asyncio.timeout(self.config.heartbeat_s):
                    await self._status_dirty.wait()
            except TimeoutError:
                pass
            self._status_dirty.clear()
            try:
                await self.client.post_status(self.status_report().to_json())
                backoff.reset()
            except TransportError as exc:
                log.warning("status report failed: %s", exc)
                await asyncio.sleep(backoff.next_delay())
                self._status_dirty.set()

    def _cut_metrics(self) -> None:
        def persist(next_seq: int) -> None:
            self.state.next_seq = next_seq
            self.dirs.save_state(self.state)

        batch = self.metrics.cut(_utcnow(), persist)
        if batch is not None:
            self.pending_batches.append(batch)
            if len(self.pending_batches) > self.config.max_pending_batches:
                dropped = self.pending_batches.pop(0)
                log.warning("metrics buffer full: dropped batch %d", dropped.seq)

    async def _flush_metrics(self, final: bool = False) -> None:
        if final:
            self._cut_metrics()
        while self.pending_batches:
            await self.client.post_metrics(self.pending_batches[0].to_json())
            self.pending_batches.pop(0)

    async def _metrics_loop(self) -> None:
        backoff = Backoff()
        while True:
            await asyncio.sleep(self.config.metrics_interval_s)
            self._cut_metrics()
            try:
                await self._flush_metrics()
                backoff.reset()
            except TransportError as exc:
                log.warning(
                    "metrics report failed (%d pending): %s", len(self.pending_batches), exc
                )
                await asyncio.sleep(backoff.next_delay())
