"""The control plane's server lifecycle (as uvicorn keeps its ``Server`` apart from the app):
listen behind the connection guard, run until a signal, drain within a bound, exit.

A second signal, or a drain that overruns its bound (even with the event loop stuck), ends the
process at once with status 1.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
import threading

from aiohttp import web

from control_plane.config import ServerConfig
from control_plane.errors import ConfigError

log = logging.getLogger("modelfleet.server")


def server_tls_context(config: ServerConfig) -> ssl.SSLContext | None:
    """TLS for --tls-cert/--tls-key; with --tls-client-ca every client must present a
    certificate that CA signed (mutual TLS). Raises ConfigError for unreadable files."""
    if not config.tls_cert_file:
        return None
    try:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(config.tls_cert_file, config.tls_key_file)
        if config.tls_client_ca_file:
            ctx.load_verify_locations(config.tls_client_ca_file)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"TLS: {exc}") from None
    return ctx


async def serve(config: ServerConfig) -> None:
    """Run until SIGINT/SIGTERM, then drain within ``config.drain_s``; a second signal (or
    a drain that overruns) exits at once with status 1."""
    # Imported here: the server's stack (SQLAlchemy, Alembic) would slow every other command.
    from control_plane.app import create_app
    from control_plane.security import redact
    from control_plane.security.netguard import ConnectionLimits, GuardedSite, fd_budget

    redact.install()
    redact.add_secret(config.mqtt_password)
    app = create_app(config)
    tls = server_tls_context(config)
    limits = ConnectionLimits(
        header_timeout_s=config.header_timeout_s,
        keepalive_timeout_s=config.keepalive_timeout_s,
        max_connections=fd_budget(config.max_connections),
    )
    # Requests in flight get a quarter of the drain twice over (aiohttp waits that long, then
    # cancels and waits again); the app's own shutdown (http._stop) has the other half.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=config.drain_s / 4)
    await runner.setup()
    site = GuardedSite(runner, config.host, config.port, limits=limits, ssl_context=tls)
    await site.start()
    log.info(
        "control plane listening on %s://%s:%d (database %s)%s",
        "https" if tls else "http",
        config.host,
        config.port,
        config.database_url.split("@")[-1],
        ", client certificates required" if config.tls_client_ca_file else "",
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set():
            os._exit(1)  # second signal: the operator wants out now
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    await stop.wait()
    log.info(
        "shutting down: draining for at most %.1fs (%d connections open)",
        config.drain_s,
        site.open_connections,
    )
    # The bound holds even if the loop itself is stuck: a thread ends the process.
    watchdog = threading.Timer(config.drain_s + 2.0, _overran, args=(config.drain_s,))
    watchdog.daemon = True
    watchdog.start()
    cleanup = asyncio.ensure_future(runner.cleanup())
    done, _ = await asyncio.wait({cleanup}, timeout=config.drain_s)
    if not done:
        _overran(config.drain_s)
    watchdog.cancel()
    cleanup.result()
    log.info("stopped")


def _overran(drain_s: float) -> None:
    log.error("the drain did not finish within %.1fs: exiting now", drain_s)
    logging.shutdown()
    os._exit(1)
