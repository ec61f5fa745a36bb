"""``modelfleet server`` and ``modelfleet db upgrade``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from pathlib import Path

from control_plane.cli.common import CliError
from control_plane.config import ServerConfig
from control_plane.errors import ConfigError, SettingsError
from control_plane.server import serve
from control_plane.settings import load_settings, server_config

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
    p.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="also serve GET /metrics here, without authentication (on the API port it "
        "needs a fleet:read token)",
    )
    p.add_argument(
        "--otlp-endpoint",
        metavar="URL",
        help="export traces and metrics over OTLP/HTTP to this collector base URL (the "
        "otel extra; also OTEL_EXPORTER_OTLP_ENDPOINT, with OTEL_SERVICE_NAME and "
        "OTEL_RESOURCE_ATTRIBUTES)",
    )
    p.add_argument(
        "--otlp-interval",
        type=float,
        metavar="SECONDS",
        help="export metrics (and send finished spans) at least this often (10)",
    )
    p.add_argument(
        "--webhook-allow-private",
        action="store_true",
        default=None,
        help="let webhook receivers be on loopback or private addresses (never link-local)",
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


def cmd_server(args: argparse.Namespace) -> int:
    """Run the control plane."""
    config = server_config(args)
    try:
        asyncio.run(serve(config))
    except SettingsError:
        raise
    except ConfigError as exc:  # what the settings could not check: a key file's content
        raise CliError(str(exc), 1) from None
    return 0


def _db_config(args: argparse.Namespace) -> ServerConfig:
    s = load_settings(args)
    return ServerConfig(data_dir=s["data_dir"], db_url=s["db"])


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    """Apply migrations."""
    from control_plane.db.engine import Database

    cfg = _db_config(args)

    async def run() -> None:
        from control_plane.security.files import ensure_private_dir

        ensure_private_dir(cfg.data_dir)
        db = Database(cfg.database_url)
        try:
            await db.migrate()
        finally:
            await db.close()

    asyncio.run(run())
    print("database is at the latest schema")
    return 0


def cmd_db_backup(args: argparse.Namespace) -> int:
    """Copy the live SQLite database with its online backup API (consistent while serving)."""
    from control_plane.db.backup import backup, sqlite_path

    src = sqlite_path(_db_config(args).database_url)
    backup(src, args.out)
    print(f"backed up {src} to {args.out}")
    return 0


def cmd_db_restore(args: argparse.Namespace) -> int:
    """Replace the SQLite database with a backup (stop the server first)."""
    from control_plane.db.backup import restore, sqlite_path

    dest = sqlite_path(_db_config(args).database_url)
    restore(args.backup, dest)
    print(f"restored {dest} from {args.backup}")
    return 0


def cmd_mqtt_passwd(args: argparse.Namespace) -> int:
    """Every enrolled agent's broker credentials, plus the control plane's own."""
    from control_plane.mqtt.broker_auth import password_entries, password_file
    from control_plane.security.files import write_private

    cfg = _db_config(args)
    cp_password = args.control_plane_password or os.environ.get("MODELFLEET_MQTT_PASSWORD")
    if not cp_password:
        raise CliError(
            "the control plane's broker password is needed: "
            "--control-plane-password or MODELFLEET_MQTT_PASSWORD"
        )
    entries = asyncio.run(password_entries(cfg.database_url, cp_password))
    write_private(args.out, password_file(entries).encode(), 0o600)
    print(f"wrote {args.out}: {len(entries) - 1} agents and the control plane")
    return 0


def cmd_mqtt_acl(args: argparse.Namespace) -> int:
    """The pattern ACL: each agent reaches only its own topics."""
    from control_plane.mqtt.broker_auth import acl_file
    from control_plane.security.files import write_private

    write_private(args.out, acl_file(args.prefix).encode(), 0o644)
    print(f"wrote {args.out}")
    return 0
