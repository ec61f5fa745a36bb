"""``modelfleet server`` and ``modelfleet db upgrade``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import signal
import sqlite3
import ssl
import threading
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aiohttp import web

from control_plane.cli.common import CliError
from control_plane.config import Retention, ServerConfig

log = logging.getLogger("modelfleet.server")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the server and db commands."""
    p = sub.add_parser("server", help="run the control plane")
    p.add_argument("--config", type=Path, help="control-plane.toml (MODELFLEET_* env overrides)")
    p.add_argument("--data-dir", type=Path, help="(./modelfleet-data)")
    p.add_argument("--host", help="(127.0.0.1)")
    p.add_argument("--port", type=int, help="(8400)")
    p.add_argument("--db", help="database URL (default: SQLite in the data dir)")
    p.add_argument(
        "--trust-publisher",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="a publisher's public key (repeatable)",
    )
    p.add_argument(
        "--keyset",
        type=Path,
        metavar="FILE",
        help="a signed key set (modelfleet keys rotate --init) to install at start; "
        "from then on it decides which publishers are trusted",
    )
    p.add_argument(
        "--signing-key",
        type=Path,
        metavar="FILE",
        help="the key desired states are signed with (<data-dir>/control-plane.key)",
    )
    p.add_argument(
        "--credential-cost",
        type=int,
        metavar="LOG2N",
        help="scrypt cost of stored agent credentials, log2 of N, 10..20 (12: 4 MiB "
        "and ~13 ms per enrollment, and per agent's first request to a replica)",
    )
    p.add_argument("--max-bundle-mb", type=int, help="(512)")
    p.add_argument("--mqtt", help="broker URL, mqtt://host:1883 or mqtts://host:8883")
    p.add_argument("--mqtt-public-url", help="the broker URL agents dial, if different")
    p.add_argument("--mqtt-prefix", help="topic prefix (modelfleet/v1)")
    p.add_argument("--mqtt-ca", help="CA file to verify an mqtts:// broker")
    p.add_argument(
        "--controller-interval", type=float, help="seconds between looks at running rollouts (1.0)"
    )
    p.add_argument(
        "--retain-raw", help="keep raw metric windows this long, then roll them up per minute (6h)"
    )
    p.add_argument(
        "--retain-minutes", help="keep per-minute roll-ups this long, then per hour (7d)"
    )
    p.add_argument("--retain-hours", help="keep per-hour roll-ups this long (400d)")
    p.add_argument("--rollup-interval", type=float, help="seconds between roll-up passes (60)")
    p.add_argument("--tls-cert", help="serve HTTPS with this certificate (PEM, chain first)")
    p.add_argument("--tls-key", help="the certificate's private key (PEM)")
    p.add_argument(
        "--tls-client-ca",
        help="require client certificates signed by this CA (mutual TLS for agents and operators)",
    )
    p.add_argument(
        "--rate-limit",
        type=float,
        help="requests per second per API token or agent "
        "credential, bursts of 4x (50; 0 turns it off)",
    )
    p.add_argument(
        "--blob-store",
        help="where blobs live: a directory (default <data-dir>/blobs)"
        " or s3://bucket/prefix (endpoint from AWS_ENDPOINT_URL)",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        help="open connections at once; one more is answered 503 (4096; an HTTP "
        "agent holds up to 2, an MQTT agent none)",
    )
    p.add_argument(
        "--header-timeout", type=float, help="seconds a client has to send a request's headers (10)"
    )
    p.add_argument(
        "--keepalive-timeout",
        type=float,
        help="seconds an idle kept-alive connection stays open (30)",
    )
    p.add_argument(
        "--refusal-rate",
        type=float,
        help="unauthenticated refusals (401) per second per source address before "
        "it gets 429, bursts of 10x (10; 0 turns it off)",
    )
    p.add_argument(
        "--db-pool-size",
        type=int,
        help="database sessions open at once (15 on SQLite, 30 on PostgreSQL)",
    )
    p.add_argument(
        "--db-wait",
        type=float,
        help="seconds a request waits for a database "
        "session before it is answered 503 with Retry-After (10)",
    )
    p.add_argument(
        "--drain",
        type=float,
        metavar="SECONDS",
        help="on SIGTERM, exit within this long whatever is open (10)",
    )
    p.set_defaults(func=cmd_server)

    db = sub.add_parser("db", help="database maintenance")
    dbsub = db.add_subparsers(dest="db_command", required=True)
    up = dbsub.add_parser("upgrade", help="apply migrations")
    _db_options(up)
    up.set_defaults(func=cmd_db_upgrade)
    bk = dbsub.add_parser("backup", help="online backup of the SQLite database to a file")
    _db_options(bk)
    bk.add_argument("--out", type=Path, required=True)
    bk.set_defaults(func=cmd_db_backup)
    rs = dbsub.add_parser("restore", help="restore a SQLite backup (server stopped)")
    _db_options(rs)
    rs.add_argument("backup", type=Path)
    rs.set_defaults(func=cmd_db_restore)

    mq = sub.add_parser("mqtt", help="broker credentials and ACLs for Mosquitto")
    mqsub = mq.add_subparsers(dest="mqtt_command", required=True)
    pw = mqsub.add_parser("passwd", help="write a Mosquitto password file from the database")
    _db_options(pw)
    pw.add_argument("--out", type=Path, required=True)
    pw.add_argument(
        "--control-plane-password",
        help="the control plane's broker password (MODELFLEET_MQTT_PASSWORD)",
    )
    pw.set_defaults(func=cmd_mqtt_passwd)
    acl = mqsub.add_parser("acl", help="write the Mosquitto ACL file")
    acl.add_argument("--out", type=Path, required=True)
    acl.add_argument("--prefix", default="modelfleet/v1")
    acl.set_defaults(func=cmd_mqtt_acl)


def _db_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path)
    p.add_argument("--data-dir", type=Path)
    p.add_argument("--db", help="database URL")


# name -> (environment variable, parser, default)
SETTINGS: dict[str, tuple[str, Any, Any]] = {
    "data_dir": ("MODELFLEET_DATA_DIR", Path, Path("./modelfleet-data")),
    "host": ("MODELFLEET_HOST", str, "127.0.0.1"),
    "port": ("MODELFLEET_PORT", int, 8400),
    "db": ("MODELFLEET_DB", str, None),
    "trust_publishers": (
        "MODELFLEET_TRUST_PUBLISHERS",
        lambda v: [Path(p) for p in (v.split(":") if isinstance(v, str) else v)],
        [],
    ),
    "keyset": ("MODELFLEET_KEYSET", Path, None),
    "signing_key": ("MODELFLEET_SIGNING_KEY", Path, None),
    "credential_cost": ("MODELFLEET_CREDENTIAL_COST", int, 12),
    "max_bundle_mb": ("MODELFLEET_MAX_BUNDLE_MB", int, 512),
    "controller_interval": ("MODELFLEET_CONTROLLER_INTERVAL", float, 1.0),
    "mqtt": ("MODELFLEET_MQTT", str, None),
    "mqtt_public_url": ("MODELFLEET_MQTT_PUBLIC_URL", str, None),
    "mqtt_password": ("MODELFLEET_MQTT_PASSWORD", str, None),
    "mqtt_prefix": ("MODELFLEET_MQTT_PREFIX", str, "modelfleet/v1"),
    "mqtt_ca": ("MODELFLEET_MQTT_CA", str, None),
    "retain_raw": ("MODELFLEET_RETAIN_RAW", lambda v: retention_seconds(v), 6 * 3600.0),
    "retain_minutes": ("MODELFLEET_RETAIN_MINUTES", lambda v: retention_seconds(v), 7 * 86400.0),
    "retain_hours": ("MODELFLEET_RETAIN_HOURS", lambda v: retention_seconds(v), 400 * 86400.0),
    "rollup_interval": ("MODELFLEET_ROLLUP_INTERVAL", float, 60.0),
    "blob_store": ("MODELFLEET_BLOB_STORE", str, None),
    "rate_limit": ("MODELFLEET_RATE_LIMIT", float, 50.0),
    "tls_cert": ("MODELFLEET_TLS_CERT", str, None),
    "tls_key": ("MODELFLEET_TLS_KEY", str, None),
    "tls_client_ca": ("MODELFLEET_TLS_CLIENT_CA", str, None),
    "max_connections": ("MODELFLEET_MAX_CONNECTIONS", int, 4096),
    "header_timeout": ("MODELFLEET_HEADER_TIMEOUT", float, 10.0),
    "keepalive_timeout": ("MODELFLEET_KEEPALIVE_TIMEOUT", float, 30.0),
    "refusal_rate": ("MODELFLEET_REFUSAL_RATE", float, 10.0),
    "db_pool_size": ("MODELFLEET_DB_POOL_SIZE", int, None),
    "db_wait": ("MODELFLEET_DB_WAIT", float, 10.0),
    "drain": ("MODELFLEET_DRAIN", float, 10.0),
}


_RETENTION_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*")


def retention_seconds(value: object) -> float:
    """Seconds from ``90s``, ``30m``, ``6h``, ``7d`` or a number; raises ValueError."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (m := _RETENTION_RE.fullmatch(value)):
        seconds = float(m[1]) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m[2]]
    else:
        raise ValueError(f"not a duration: {value!r}")
    if not 60 <= seconds <= 10 * 365 * 86400:
        raise ValueError(f"must be between 1m and 10 years, got {value!r}")
    return seconds


def load_settings(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Command line over MODELFLEET_* over the --config file over defaults.

    Raises CliError naming the setting (and the file or variable) that is wrong.
    """
    env = os.environ if env is None else env
    out = {name: default for name, (_, _, default) in SETTINGS.items()}
    path = getattr(args, "config", None)
    if path is not None:
        try:
            doc = tomllib.loads(path.read_text())
        except OSError as exc:
            raise CliError(f"--config {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise CliError(f"--config {path}: not valid TOML: {exc}") from None
        for key, value in doc.items():
            name = key.replace("-", "_")
            if name not in SETTINGS:
                raise CliError(f"--config {path}: unknown setting {key!r}")
            out[name] = _parse(name, value, f"{path}: {key}")
    for name, (var, _, _) in SETTINGS.items():
        if env.get(var):
            out[name] = _parse(name, env[var], var)
    cli = {
        "data_dir": args.data_dir,
        "db": args.db,
        "trust_publishers": getattr(args, "trust_publisher", None) or None,
        "keyset": getattr(args, "keyset", None),
        "signing_key": getattr(args, "signing_key", None),
        "credential_cost": getattr(args, "credential_cost", None),
        "host": getattr(args, "host", None),
        "port": getattr(args, "port", None),
        "max_bundle_mb": getattr(args, "max_bundle_mb", None),
        "controller_interval": getattr(args, "controller_interval", None),
        "mqtt": getattr(args, "mqtt", None),
        "mqtt_public_url": getattr(args, "mqtt_public_url", None),
        "mqtt_prefix": getattr(args, "mqtt_prefix", None),
        "mqtt_ca": getattr(args, "mqtt_ca", None),
        "retain_raw": _opt(args, "retain_raw", retention_seconds),
        "retain_minutes": _opt(args, "retain_minutes", retention_seconds),
        "retain_hours": _opt(args, "retain_hours", retention_seconds),
        "rollup_interval": getattr(args, "rollup_interval", None),
        "blob_store": getattr(args, "blob_store", None),
        "rate_limit": getattr(args, "rate_limit", None),
        "tls_cert": getattr(args, "tls_cert", None),
        "tls_key": getattr(args, "tls_key", None),
        "tls_client_ca": getattr(args, "tls_client_ca", None),
        **{
            name: getattr(args, name, None)
            for name in (
                "max_connections",
                "header_timeout",
                "keepalive_timeout",
                "refusal_rate",
                "db_pool_size",
                "db_wait",
                "drain",
            )
        },
    }
    out.update({k: v for k, v in cli.items() if v is not None})
    return out


def _opt(args: argparse.Namespace, name: str, parser: Any) -> Any:
    value = getattr(args, name, None)
    if value is None:
        return None
    try:
        return parser(value)
    except ValueError as exc:
        raise CliError(f"--{name.replace('_', '-')}: {exc}") from None


def _parse(name: str, value: object, where: str) -> Any:
    parser = SETTINGS[name][1]
    if parser in (int, float) and isinstance(value, bool):
        raise CliError(f"{where} must be a number")
    try:
        return parser(value)
    except (TypeError, ValueError):
        raise CliError(f"{where} has a bad value: {value!r}") from None


def _config(args: argparse.Namespace) -> ServerConfig:
    s = load_settings(args)
    if not 0 < s["port"] < 65536:
        raise CliError(f"port must be 1-65535, got {s['port']}")
    if s["max_bundle_mb"] <= 0:
        raise CliError("max_bundle_mb must be positive")
    if not 0 < s["controller_interval"] <= 3600:
        raise CliError("controller_interval must be between 0 and 3600 seconds")
    if bool(s["tls_cert"]) != bool(s["tls_key"]):
        raise CliError("tls_cert and tls_key go together")
    if s["tls_client_ca"] and not s["tls_cert"]:
        raise CliError("tls_client_ca needs tls_cert and tls_key (mutual TLS is TLS first)")
    for name in ("tls_cert", "tls_key", "tls_client_ca"):
        if s[name] and not Path(s[name]).is_file():
            raise CliError(f"{name} {s[name]}: no such file")
    if not 0 <= s["rate_limit"] <= 1e6:
        raise CliError("rate_limit must be between 0 (off) and 1000000 requests per second")
    if not 0 < s["rollup_interval"] <= 86400:
        raise CliError("rollup_interval must be between 0 and 86400 seconds")
    _check_limits(s)
    retention = Retention(
        s["retain_raw"], s["retain_minutes"], s["retain_hours"], max(s["retain_minutes"], 86400.0)
    )
    try:
        retention.check()
    except ValueError as exc:
        raise CliError(f"retention: {exc}") from None
    if s["blob_store"]:
        from control_plane.blobstore import check_blob_store_url

        try:
            check_blob_store_url(s["blob_store"])
        except ValueError as exc:
            raise CliError(f"blob_store: {exc}") from None
    if s["mqtt"]:
        from control_plane.mqtt import broker_address

        try:
            broker_address(s["mqtt"])
        except ValueError as exc:
            raise CliError(f"mqtt: {exc}") from None
    for f in s["trust_publishers"]:
        if not f.is_file():
            raise CliError(f"trusted publisher key {f}: no such file")
    from control_plane.auth import CREDENTIAL_COSTS  # here: the agent's CLI must not load it

    if s["credential_cost"] not in CREDENTIAL_COSTS:
        raise CliError(f"credential_cost: {s['credential_cost']} is not between 10 and 20")
    if s["keyset"] is not None and not s["keyset"].is_file():
        raise CliError(f"key set {s['keyset']}: no such file")
    return ServerConfig(
        data_dir=s["data_dir"],
        keyset_file=s["keyset"],
        signing_key_file=s["signing_key"],
        credential_cost=s["credential_cost"],
        db_url=s["db"],
        host=s["host"],
        port=s["port"],
        trusted_publisher_files=tuple(s["trust_publishers"]),
        max_bundle_bytes=s["max_bundle_mb"] * 1024 * 1024,
        controller_interval_s=s["controller_interval"],
        mqtt_url=s["mqtt"],
        mqtt_public_url=s["mqtt_public_url"],
        mqtt_password=s["mqtt_password"],
        mqtt_prefix=s["mqtt_prefix"],
        mqtt_ca_file=s["mqtt_ca"],
        retention=retention,
        rollup_interval_s=s["rollup_interval"],
        blob_store_url=s["blob_store"],
        rate_limit_per_s=s["rate_limit"],
        tls_cert_file=s["tls_cert"],
        tls_key_file=s["tls_key"],
        tls_client_ca_file=s["tls_client_ca"],
        rate_limit_burst=max(20.0, 4 * s["rate_limit"]),
        max_connections=s["max_connections"],
        header_timeout_s=s["header_timeout"],
        keepalive_timeout_s=s["keepalive_timeout"],
        refusal_rate_per_s=s["refusal_rate"],
        refusal_burst=max(20.0, 10 * s["refusal_rate"]),
        db_pool_size=s["db_pool_size"],
        db_wait_s=s["db_wait"],
        drain_s=s["drain"],
    )


def _check_limits(s: dict[str, Any]) -> None:
    """Raise CliError naming the connection, database or drain setting that is out of range."""
    from control_plane.netguard import ConnectionLimits

    try:
        ConnectionLimits(s["header_timeout"], s["keepalive_timeout"], s["max_connections"]).check()
    except ValueError as exc:
        raise CliError(str(exc).replace("_s ", " ", 1)) from None
    if not 0 <= s["refusal_rate"] <= 1e6:
        raise CliError("refusal_rate must be between 0 (off) and 1000000 per second")
    if s["db_pool_size"] is not None and not 1 <= s["db_pool_size"] <= 1000:
        raise CliError("db_pool_size must be between 1 and 1000")
    if not 0 < s["db_wait"] <= 600:
        raise CliError("db_wait must be between 0 and 600 seconds")
    if not 0 < s["drain"] <= 3600:
        raise CliError("drain must be between 0 and 3600 seconds")


def server_tls_context(config: ServerConfig) -> ssl.SSLContext | None:
    """TLS for --tls-cert/--tls-key; with --tls-client-ca every client must present a
    certificate that CA signed (mutual TLS). Raises CliError for unreadable files."""
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
        raise CliError(f"TLS: {exc}") from None
    return ctx


async def serve(config: ServerConfig) -> None:
    """Run until SIGINT/SIGTERM, then drain within ``config.drain_s``; a second signal (or
    a drain that overruns) exits at once with status 1."""
    # Imported here: the server's stack (SQLAlchemy, Alembic) would slow every other command.
    from control_plane import redact
    from control_plane.app import create_app
    from control_plane.errors import ConfigError
    from control_plane.netguard import ConnectionLimits, GuardedSite, fd_budget

    redact.install()
    redact.add_secret(config.mqtt_password)
    try:
        app = create_app(config)
    except ConfigError as exc:
        raise CliError(str(exc), 1) from None
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


def cmd_server(args: argparse.Namespace) -> int:
    """Run the control plane."""
    asyncio.run(serve(_config(args)))
    return 0


def _db_config(args: argparse.Namespace) -> ServerConfig:
    s = load_settings(args)
    return ServerConfig(data_dir=s["data_dir"], db_url=s["db"])


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    """Apply migrations."""
    from control_plane.db.engine import Database

    cfg = _db_config(args)

    async def run() -> None:
        from control_plane.files import ensure_private_dir

        ensure_private_dir(cfg.data_dir)
        db = Database(cfg.database_url)
        try:
            await db.migrate()
        finally:
            await db.close()

    asyncio.run(run())
    print("database is at the latest schema")
    return 0


def _sqlite_path(cfg: ServerConfig) -> Path:
    from sqlalchemy.engine import make_url

    url = make_url(cfg.database_url)
    if not url.drivername.startswith("sqlite") or not url.database:
        raise CliError(
            "db backup/restore handle SQLite; for PostgreSQL use pg_dump / pg_restore "
            "(see README, Operations)"
        )
    return Path(url.database)


def cmd_db_backup(args: argparse.Namespace) -> int:
    """Copy the live SQLite database with its online backup API (consistent while serving)."""
    src = _sqlite_path(_db_config(args))
    if not src.is_file():
        raise CliError(f"no database at {src}")
    if args.out.exists():
        raise CliError(f"{args.out} exists; choose a new file")
    with sqlite3.connect(src) as source, sqlite3.connect(args.out) as dest:
        source.backup(dest)
    args.out.chmod(0o600)
    print(f"backed up {src} to {args.out}")
    return 0


def cmd_db_restore(args: argparse.Namespace) -> int:
    """Replace the SQLite database with a backup (stop the server first)."""
    dest = _sqlite_path(_db_config(args))
    try:
        with sqlite3.connect(f"file:{args.backup}?mode=ro", uri=True) as check:
            tables = {r[0] for r in check.execute("SELECT name FROM sqlite_master")}
    except sqlite3.DatabaseError as exc:
        raise CliError(f"{args.backup} is not a SQLite database: {exc}") from None
    if "alembic_version" not in tables:
        raise CliError(f"{args.backup} is not a modelfleet database (no alembic_version)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(args.backup) as source, sqlite3.connect(dest) as target:
        source.backup(target)
    print(f"restored {dest} from {args.backup}")
    return 0


def cmd_mqtt_passwd(args: argparse.Namespace) -> int:
    """Every enrolled agent's broker credentials, plus the control plane's own."""
    from sqlalchemy import select

    from control_plane.db.engine import Database
    from control_plane.db.models import Agent
    from control_plane.mqtt_auth import CONTROL_PLANE_USER, mosquitto_hash, password_file

    cfg = _db_config(args)
    cp_password = args.control_plane_password or os.environ.get("MODELFLEET_MQTT_PASSWORD")
    if not cp_password:
        raise CliError(
            "the control plane's broker password is needed: "
            "--control-plane-password or MODELFLEET_MQTT_PASSWORD"
        )

    async def rows() -> list[tuple[str, str]]:
        db = Database(cfg.database_url)
        try:
            await db.migrate()
            async with db.read() as s:
                found = await s.execute(select(Agent.id, Agent.mqtt_password_hash))
                return [(a, h) for a, h in found if h]
        finally:
            await db.close()

    entries = [*asyncio.run(rows()), (CONTROL_PLANE_USER, mosquitto_hash(cp_password))]
    from control_plane.files import write_private

    write_private(args.out, password_file(entries).encode(), 0o600)
    print(f"wrote {args.out}: {len(entries) - 1} agents and the control plane")
    return 0


def cmd_mqtt_acl(args: argparse.Namespace) -> int:
    """The pattern ACL: each agent reaches only its own topics."""
    from control_plane.files import write_private
    from control_plane.mqtt_auth import acl_file

    write_private(args.out, acl_file(args.prefix).encode(), 0o644)
    print(f"wrote {args.out}")
    return 0
