"""create_app: the control plane's components wired together, and their background tasks.

Wiring only: the handlers, middleware and route table live in ``control_plane/api/``, the
shared State in ``control_plane/state.py``. The app's life: migrate and seed at start, run the
rollout controller, the metric roll-up, the audit flush, webhook deliveries, PostgreSQL NOTIFY
and the MQTT bridge beside the requests, and on shutdown drain (long-polls answer at once,
queued reports are stored, the pool closes).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

from aiohttp import web

from control_plane.api import metrics, tracing
from control_plane.api.dashboard import add_ui_routes
from control_plane.api.middleware import MIDDLEWARES
from control_plane.api.routes import add_api_routes
from control_plane.catalog.blobstore import open_blob_store
from control_plane.config import ServerConfig
from control_plane.db.engine import Database, PoolLimits
from control_plane.events.delivery import DeliveryConfig, WebhookDeliverer
from control_plane.events.retry import RetryPolicy
from control_plane.events.watch import OfflineWatch
from control_plane.fleet import commands
from control_plane.fleet.desired import DesiredSigner
from control_plane.fleet.ingest import Ingestor
from control_plane.fleet.notify import DesiredNotifier
from control_plane.metrics.rollup import rollup
from control_plane.rollout.controller import RolloutController
from control_plane.security import audit, keyset
from control_plane.security.auth import ensure_admin_token
from control_plane.security.files import ensure_private_dir
from control_plane.security.keys import load_or_create_signing_key, load_trusted_publishers
from control_plane.security.ratelimit import RateLimiter
from control_plane.state import MQTT, STATE, Clock, State
from control_plane.telemetry import start as start_telemetry

log = logging.getLogger("modelfleet.control_plane")


def _utcnow() -> datetime:
    return datetime.now(UTC)


def create_app(config: ServerConfig, clock: Clock = _utcnow) -> web.Application:
    """Build the control plane app; migrations and the admin token run at startup.

    Raises ConfigError for unreadable keys.
    """
    ensure_private_dir(config.data_dir)
    key_file = config.signing_key_file or config.data_dir / "control-plane.key"
    db = Database(config.database_url, pool=PoolLimits(config.db_pool_size, config.db_wait_s))
    telemetry = start_telemetry(config.telemetry)
    signer = DesiredSigner(
        load_or_create_signing_key(key_file),
        timedelta(seconds=config.desired_ttl_s),
        telemetry=telemetry,
    )
    notifier = DesiredNotifier()
    state = State(
        config=config,
        db=db,
        store=open_blob_store(config.blob_store_url, config.blob_dir),
        signer=signer,
        notifier=notifier,
        telemetry=telemetry,
        trusted=load_trusted_publishers(
            config.trusted_publisher_files, config.data_dir / "trusted-publishers"
        ),
        clock=clock,
        controller=RolloutController(
            db=db,
            signer=signer,
            notifier=notifier,
            clock=clock,
            interval_s=config.controller_interval_s,
        ),
        ingest=Ingestor(db, clock, max_age_s=config.retention.batches_s),
        limiter=RateLimiter(config.rate_limit_per_s, config.rate_limit_burst)
        if config.rate_limit_per_s > 0
        else None,
        refusal_limiter=RateLimiter(config.refusal_rate_per_s, config.refusal_burst)
        if config.refusal_rate_per_s > 0
        else None,
        refusals=audit.RefusalLog(db, config.audit_coalesce_s),
        webhooks=WebhookDeliverer(
            db=db,
            clock=clock,
            config=DeliveryConfig(
                retry=RetryPolicy(
                    max_attempts=config.webhook_max_attempts, base_s=config.webhook_retry_base_s
                ),
                timeout_s=config.webhook_timeout_s,
                allow_private=config.webhook_allow_private,
            ),
            offline=OfflineWatch(db=db, clock=clock, offline_after_s=config.offline_after_s),
        ),
    )
    traced = (tracing.tracing_middleware,) if telemetry.enabled else ()
    app = web.Application(
        middlewares=(metrics.metrics_middleware, *traced, *MIDDLEWARES),
        client_max_size=config.max_json_bytes,
    )
    app[STATE] = state
    metrics.install(app)
    add_api_routes(app)
    add_ui_routes(app)
    app.cleanup_ctx.append(_lifecycle)
    if telemetry.enabled:  # after _lifecycle: the last figures are read before the pool closes
        app.cleanup_ctx.append(tracing.telemetry_context)
    if config.metrics_listen is not None:
        # After _lifecycle: it listens once the database is migrated, and stops first.
        app.cleanup_ctx.append(metrics.MetricsListener(app, *config.metrics_listen).context)
    app.on_shutdown.append(_begin_drain)
    return app


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    await state.db.migrate()
    async with state.db.write() as s:
        token_file = state.config.data_dir / "admin-token"
        if await ensure_admin_token(s, token_file):
            log.warning("empty database: wrote an admin API token to %s", token_file)
    ks = await keyset.at_start(
        state.db, state.config.keyset_file, state.signer.key.public_key(), state.clock()
    )
    if ks is not None:
        if state.config.trusted_publisher_files:
            log.warning(
                "key set version %d decides which publishers are trusted: the "
                "--trust-publisher files are not used",
                ks.version,
            )
    elif not state.trusted:
        log.warning("no trusted publisher keys: every bundle push will be refused")
    state.ingest.start()
    tasks = [
        asyncio.create_task(state.controller.run(), name="rollout-controller"),
        asyncio.create_task(_rollup_loop(state), name="metric-rollup"),
        asyncio.create_task(_audit_flush_loop(state), name="audit-flush"),
    ]
    if state.webhooks is not None:
        tasks.append(asyncio.create_task(state.webhooks.run(), name="webhook-delivery"))
    if not state.db.is_sqlite:
        # Imported here: only a PostgreSQL deployment needs the driver's LISTEN/NOTIFY.
        from control_plane.fleet.pgnotify import PgNotifyBridge

        pg = PgNotifyBridge(state.db.url, state.notifier)
        state.notifier.listeners.append(pg.send)
        tasks.append(asyncio.create_task(pg.run(), name="pg-notify"))
    if state.config.mqtt_url:
        # Imported here: only a deployment with a broker needs the MQTT client.
        from control_plane.mqtt.bridge import MqttBridge

        bridge = MqttBridge(
            state.config,
            state.db,
            state.clock,
            store=state.store,
            ingest=state.ingest,
            answers=state.answers,
        )
        app[MQTT] = bridge
        state.notifier.listeners.append(bridge.notify)
        tasks.append(asyncio.create_task(bridge.run(), name="mqtt-bridge"))
    yield
    await _stop(state, tasks)


async def _rollup_loop(state: State) -> None:
    """Roll metric windows up (raw → minute → hour) and drop what is past retention: metric
    rows, and operator commands' answers."""
    while True:
        await asyncio.sleep(state.config.rollup_interval_s)
        try:
            await rollup(state.db, state.clock(), state.config.retention)
        except asyncio.CancelledError:
            raise
        except Exception:
            # The loop's boundary: a failed pass (the database went away) is retried next time.
            log.exception("metric roll-up failed")
        try:
            await commands.prune(state.db, state.clock(), state.config.command_retention_s)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("pruning operator commands failed")  # retried next pass


async def _audit_flush_loop(state: State) -> None:
    """Write the counts of coalesced refusals whose window has ended."""
    if state.refusals is None:
        return
    while True:
        await asyncio.sleep(state.config.audit_coalesce_s)
        try:
            await state.refusals.flush(state.clock())
        except asyncio.CancelledError:
            raise
        except Exception:
            # The loop's boundary: the counts stay in memory and are written next time.
            log.exception("could not write coalesced audit refusals")


async def _begin_drain(app: web.Application) -> None:
    # The runner's shutdown: the listener is closed and idle connections with it; answer the
    # waiting long-polls now, so that only real work is left for the drain time.
    app[STATE].drain()


async def _stop(state: State, tasks: list[asyncio.Task[None]]) -> None:
    """The end of a drain: background tasks (the MQTT bridge disconnects from the broker),
    then what ingest has queued is committed, refusals counted, the pool closed. Each step
    gets a quarter of ``drain_s`` (the runner gives requests the other half), so a broker or
    database that does not answer cannot hold the exit."""
    state.drain()  # also when the app is closed without the runner's shutdown signal
    budget = state.config.drain_s / 4
    for task in tasks:
        task.cancel()
    _, late = await asyncio.wait(tasks, timeout=budget)
    for task in late:
        log.warning("%s did not stop within %.1fs; left behind", task.get_name(), budget)
        task.cancel()
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            log.error("%s ended with an error", task.get_name(), exc_info=task.exception())
    try:
        async with asyncio.timeout(budget):
            await state.ingest.close()
            if state.refusals is not None:
                await state.refusals.flush()
    except TimeoutError:
        log.error("reports still queued after %.1fs were not stored", budget)
    except Exception:
        # Shutdown's boundary: the database is gone; say so and still close the pool.
        log.exception("could not store the last reports and audit counts")
    await state.db.close()
