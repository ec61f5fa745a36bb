"""The agent daemon: builds the parts, runs and supervises their loops, reloads, shuts down.

The parts own their state: the desired-state sync (agent/sync.py), the updater
(agent/update/updater.py), the serving table (agent/serving/), the key ring, the metrics outbox
and the status reporter (agent/report/). One async context manager owns every task and the
inference server; leaving it stops accepting requests, drains, flushes metrics once, and
disconnects.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from aiohttp import web

from agent.client import ControlPlaneClient
from agent.commands import CommandChannel
from agent.config import AgentConfig
from agent.exceptions import AgentConfigError
from agent.host.diagnostics import LogRing
from agent.host.facts import gather_facts
from agent.host.failpoints import Failpoints
from agent.host.systemd import Notifier
from agent.keyring import KeyRing
from agent.mqtt import MqttLink, MqttSettings
from agent.report.buffer import MetricsBuffer
from agent.report.metrics import MetricsRecorder
from agent.report.outbox import MetricsOutbox
from agent.report.status import StatusReporter
from agent.serving.app import start_serving
from agent.serving.prom import Gauges
from agent.serving.runtime import LoadedModel
from agent.serving.table import RolledBack, ServingTable
from agent.storage.blobs import LocalStore
from agent.storage.state import Identity, PersistentState, StateDir
from agent.sync import DesiredSync
from agent.telemetry import start as start_telemetry
from agent.tls import client_context
from agent.update.updater import Updater
from protocol.keyset import KeySet
from protocol.reports import ModelStatus, StatusReport

if TYPE_CHECKING:
    from agent.serving.grpc import GrpcServer

log = logging.getLogger("modelfleet.agent")


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Agent:
    """One running agent."""

    def __init__(self, config: AgentConfig, notifier: Notifier | None = None) -> None:
        self.config = config
        self.notifier = notifier or Notifier({})
        self.started = time.monotonic()
        self.dirs = StateDir(config.state_dir)
        self.identity: Identity = self.dirs.load_identity()
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
        self.last_error: str | None = None
        self.facts = gather_facts()
        self.ring = LogRing()  # recent log lines, redacted, for operators' commands
        self.metrics = MetricsRecorder(_utcnow())
        self.telemetry = start_telemetry(config.telemetry)
        self.telemetry.watch_inference(lambda: self.metrics.totals)
        self.serving = ServingTable(
            config=config,
            executor=self.executor,
            metrics=self.metrics,
            on_rolled_back=self._rolled_back,
            telemetry=self.telemetry,
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
        self._tasks: list[asyncio.Task[None]] = []
        self._runner: web.AppRunner | None = None
        self.serve_port: int | None = None
        self._grpc: GrpcServer | None = None
        self.grpc_port: int | None = None
        self.mqtt = self._mqtt_link()
        self.updater = Updater(
            config=config,
            dirs=self.dirs,
            store=self.store,
            serving=self.serving,
            keyring=self.keyring,
            client=self.client,
            mqtt=self.mqtt,
            facts=self.facts,
            failpoints=self.failpoints,
            executor=self.executor,
            on_bytes=self._downloaded_bytes,
            on_blob=self._downloaded_blob,
            note_error=self._note_error,
            changed=self.reporter.changed,
            telemetry=self.telemetry,
        )
        self.sync = DesiredSync(
            config=config,
            agent_id=self.identity.agent_id,
            client=self.client,
            keyring=self.keyring,
            mqtt=self.mqtt,
            updater=self.updater,
            note_error=self._note_error,
            last_error=lambda: self.last_error,
            on_polled=self._polled,
            changed=self.reporter.changed,
        )
        self.commands = CommandChannel(
            agent_id=self.identity.agent_id,
            state_dir=config.state_dir,
            client=self.client,
            keyring=self.keyring,
            mqtt=self.mqtt,
            ring=self.ring,
            facts=self._diagnostic_facts,
            failures=self._failures,
            poll_wait_s=config.poll_wait_s,
            poll_interval_s=config.poll_interval_s,
        )

    @property
    def keyset(self) -> KeySet | None:
        """The key set held (the key ring's)."""
        return self.keyring.keyset

    @property
    def state(self) -> PersistentState:
        """The state file's contents (the updater's)."""
        return self.updater.state

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

        async def desired(envelope: bytes) -> bool:
            return await self.sync.handle_desired(envelope, via="mqtt")

        def changed(connected: bool) -> None:
            self.sync.link_changed()
            self.commands.link_changed()
            self.reporter.changed()
            self.outbox.link_changed()

        settings = MqttSettings(
            url=url,
            username=given.get("username"),
            password=given.get("password"),
            prefix=given.get("prefix", ""),
            ca_file=self.config.mqtt_ca_file,
        )
        return MqttLink(
            self.identity.agent_id,
            settings,
            on_desired=desired,
            on_change=changed,
            on_metrics_ack=self.outbox.acked,
            on_command=lambda envelope: self.commands.receive(envelope, "mqtt"),
        )

    # ------------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Agent:
        try:
            await self._start()
        except BaseException:
            # A start that fails half-way (the serve port taken, gRPC without its extra) lets go
            # of what it had taken: the HTTP session, the listener, the log ring on the root
            # logger (which would otherwise keep collecting every later record of the process).
            try:
                await self.__aexit__(None, None, None)
            except Exception:
                log.exception("cleaning up after a failed start")
            finally:
                logging.getLogger().removeHandler(self.ring)
            raise
        return self

    async def _start(self) -> None:
        logging.getLogger().addHandler(self.ring)
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
        if self.config.grpc_host is not None:
            self.grpc_port = await self._start_grpc()
        loops = [
            ("sync", self.sync.run()),
            ("reconcile", self.updater.run()),
            ("status", self.reporter.run()),
            ("metrics", self.outbox.run()),
            ("keyset", self.keyring.run()),
            ("commands", self.commands.run()),
        ]
        if self.notifier.watchdog_s:
            loops.append(("watchdog", self._watchdog_loop(self.notifier.watchdog_s)))
        if self.mqtt is not None:
            loops.append(("mqtt", self.mqtt.run()))
        for name, coro in loops:
            self._tasks.append(asyncio.create_task(coro, name=f"agent-{name}"))
        self.reporter.changed()

    async def __aexit__(self, *exc: object) -> None:
        # Order: stop taking requests and drain them (aiohttp waits up to drain_s), stop the
        # loops, flush metrics once, disconnect.
        await asyncio.gather(
            *([self._runner.cleanup()] if self._runner is not None else []),
            *([self._grpc.__aexit__(None, None, None)] if self._grpc is not None else []),
        )
        await self.serving.aclose()
        if self.mqtt is not None:
            await self.mqtt.say_offline()
        tasks = [*self._tasks, *([self.keyring.task] if self.keyring.task else [])]
        for t in tasks:
            t.cancel()
        # Bounded: aiomqtt's disconnect waits for the broker's word with no timeout, so a broker
        # that never answers held the exit forever (a test hung so); a second cancel ends it.
        _, late = await asyncio.wait(tasks, timeout=15) if tasks else (set(), set())
        for t in late:
            log.warning("%s did not stop within 15s; cancelled again", t.get_name())
            t.cancel()
        if late:
            await asyncio.wait(late, timeout=5)
        await self.outbox.drain(3)
        await self.client.__aexit__(None, None, None)
        self.executor.shutdown(wait=True, cancel_futures=True)
        self.buffer.close()
        await self.telemetry.aclose()
        logging.getLogger().removeHandler(self.ring)

    async def _start_grpc(self) -> int:
        """Start the gRPC OIP server (the grpc extra, imported only now); its bound port.
        Raises AgentConfigError without the extra, OSError when it cannot listen."""
        try:
            from agent.serving.grpc import GrpcServer, grpc_tls
        except ImportError as exc:
            raise AgentConfigError(
                f"--grpc needs the grpc extra (pip install 'modelfleet[grpc]'): {exc}"
            ) from None
        cfg = self.config
        assert cfg.grpc_host is not None
        server = GrpcServer(
            table=self.serving, host=cfg.grpc_host, port=cfg.grpc_port, tls=grpc_tls(cfg)
        )
        await server.__aenter__()
        self._grpc = server
        log.info("gRPC inference on %s:%s", cfg.grpc_host, server.port)
        return server.port

    async def _restore(self) -> None:
        """Serve what was active before a restart, and resume the last accepted desired state."""
        self.sync.restore()
        await self.updater.restore()

    def reload(self, config: AgentConfig) -> None:
        """Take a re-read configuration (SIGHUP); raises AgentConfigError for a bad one.

        Trusted keys, intervals, health and download settings (and the gRPC port's own tokens)
        change at once; the serve and gRPC addresses, their TLS files, the serve port's tokens
        (which the REST app takes at start, and gRPC falls back to) and the state directory
        need a restart.
        """
        fixed = (
            "state_dir",
            "serve_host",
            "serve_port",
            "serve_tokens",
            "serve_cert_file",
            "serve_key_file",
            "serve_client_ca_file",
            "grpc_host",
            "grpc_port",
            "grpc_cert_file",
            "grpc_key_file",
            "grpc_client_ca_file",
        )
        if any(getattr(config, f) != getattr(self.config, f) for f in fixed):
            log.warning("serve and gRPC address, access and state directory changes need a restart")
            config = replace(config, **{f: getattr(self.config, f) for f in fixed})
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
        self.updater.reconfigure(config)
        self.sync.reconfigure(config)
        log.info("configuration reloaded (%d trusted publisher keys)", len(self.keyring.publishers))
        self.updater.wake()
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

    def _downloaded_bytes(self, n: int) -> None:
        self.counters["download_bytes"] += n

    def _downloaded_blob(self) -> None:
        self.counters["downloads"] += 1

    def _polled(self) -> None:
        self.counters["last_sync"] = time.time()

    # ------------------------------------------------------------------------ serving

    def _rolled_back(self, event: RolledBack) -> None:
        """The serving table rolled a version back: the updater records it."""
        self.updater.rolled_back(event)

    def ready(self) -> bool:
        """Every desired model has a version serving."""
        return self.serving.ready()

    # ------------------------------------------------------------------------ reports

    def _diagnostic_facts(self) -> dict[str, Any]:
        """What a support bundle says of the agent (no secret: the bundle redacts anyway)."""
        return {
            **self.facts,
            "agentId": self.identity.agent_id,
            "servePort": self.serve_port,
            "generation": self.state.highest_generation,
            "serving": [f"{lm.name} {lm.version}" for lm in self.serving.snapshot()],
            "lastError": self.last_error,
            "mqttConnected": self.mqtt.connected if self.mqtt is not None else None,
            "uptimeSeconds": round(time.monotonic() - self.started, 1),
            **self.sync.freshness(),
        }

    def _failures(self) -> list[dict[str, Any]]:
        """The last failures: versions that failed or were refused, and the last error."""
        out: list[dict[str, Any]] = [
            {"model": key, "state": p.state, "reason": p.reason}
            for key, p in self.updater.failed.items()
        ]
        if self.last_error:
            out.append({"lastError": self.last_error})
        return out

    def status_report(self) -> StatusReport:
        """The agent's status now, numbered after every report built before it (the
        reporter's (epoch, seq): agent/report/status.py)."""
        epoch, seq = self.reporter.next_number()
        models = [
            ModelStatus(
                lm.name,
                lm.version,
                lm.manifest_digest,
                "active",
                variant=lm.variant,
                config_digest=lm.config_digest,
            )
            for lm in self.serving.snapshot()
        ]
        models.extend(self.updater.model_statuses())
        facts: dict[str, Any] = {**self.facts, "servePort": self.serve_port}
        # What each model runs with; the facts schema takes 32 (protocol/facts.py).
        serving = self.serving.snapshot()[:32]
        facts["serving"] = [lm.plan.facts(lm.name) for lm in serving]
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
                **self.sync.freshness(),
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
