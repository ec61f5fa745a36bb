"""``modelfleet server`` and ``modelfleet db upgrade``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from pathlib import Path

from aiohttp import web

from control_plane.cli.common import CliError
from control_plane.config import ServerConfig

log = logging.getLogger("modelfleet.server")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the server and db commands."""
    p = sub.add_parser("server", help="run the control plane")
    p.add_argument("--data-dir", type=Path, default=Path("./modelfleet-data"))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8400)
    p.add_argument("--db", help="database URL (default: SQLite in the data dir; env MODELFLEET_DB)")
    p.add_argument(
        "--trust-publisher",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="a publisher's public key (repeatable)",
    )
    p.add_argument("--max-bundle-mb", type=int, default=512)
    p.add_argument("--controller-interval", type=float, default=1.0,
                   help="seconds between looks at running rollouts")  # fmt: skip
    p.set_defaults(func=cmd_server)

    db = sub.add_parser("db", help="database maintenance")
    dbsub = db.add_subparsers(dest="db_command", required=True)
    up = dbsub.add_parser("upgrade", help="apply migrations")
    up.add_argument("--data-dir", type=Path, default=Path("./modelfleet-data"))
    up.add_argument("--db", help="database URL (env MODELFLEET_DB)")
    up.set_defaults(func=cmd_db_upgrade)


def _config(args: argparse.Namespace) -> ServerConfig:
    if not 0 < args.port < 65536:
        raise CliError(f"--port must be 1-65535, got {args.port}")
    if args.max_bundle_mb <= 0:
        raise CliError("--max-bundle-mb must be positive")
    if not 0 < args.controller_interval <= 3600:
        raise CliError("--controller-interval must be between 0 and 3600 seconds")
    for f in args.trust_publisher:
        if not f.is_file():
            raise CliError(f"--trust-publisher {f}: no such file")
    return ServerConfig(
        data_dir=args.data_dir,
        db_url=args.db or os.environ.get("MODELFLEET_DB"),
        host=args.host,
        port=args.port,
        trusted_publisher_files=tuple(args.trust_publisher),
        max_bundle_bytes=args.max_bundle_mb * 1024 * 1024,
        controller_interval_s=args.controller_interval,
    )


async def serve(config: ServerConfig) -> None:
    """Run until SIGINT/SIGTERM; a second signal exits at once."""
    # Imported here: the server's stack (SQLAlchemy, Alembic) would slow every other command.
    from control_plane.errors import ConfigError
    from control_plane.http import create_app

    try:
        app = create_app(config)
    except ConfigError as exc:
        raise CliError(str(exc), 1) from None
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port)
    await site.start()
    log.info(
        "control plane listening on http://%s:%d (database %s)",
        config.host,
        config.port,
        config.database_url.split("@")[-1],
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
    log.info("shutting down")
    await runner.cleanup()


def cmd_server(args: argparse.Namespace) -> int:
    """Run the control plane."""
    asyncio.run(serve(_config(args)))
    return 0


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    """Apply migrations."""
    from control_plane.db.engine import Database

    url = args.db or os.environ.get("MODELFLEET_DB")
    cfg = ServerConfig(data_dir=args.data_dir, db_url=url)

    async def run() -> None:
        args.data_dir.mkdir(parents=True, exist_ok=True)
        db = Database(cfg.database_url)
        try:
            await db.migrate()
        finally:
            await db.close()

    asyncio.run(run())
    print("database is at the latest schema")
    return 0
