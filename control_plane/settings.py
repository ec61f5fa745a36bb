"""The control plane's settings: command line over ``MODELFLEET_*`` over the ``--config`` file
over defaults, checked and turned into a ``ServerConfig``.

Only the command line calls this (it alone reads the environment and files); every other part
receives the ``ServerConfig``. A bad setting raises ``SettingsError`` naming it and where it came
from (the file and key, or the variable, or the option).
"""

from __future__ import annotations

import argparse
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from control_plane.config import Retention, ServerConfig
from control_plane.errors import SettingsError
from protocol.otlp import telemetry_config

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
    "webhook_allow_private": ("MODELFLEET_WEBHOOK_ALLOW_PRIVATE", lambda v: _flag(v), False),
    "metrics_listen": ("MODELFLEET_METRICS_LISTEN", lambda v: listen_address(v), None),
    # OTLP export (also on with the standard OTEL_EXPORTER_OTLP_ENDPOINT; protocol/otlp.py).
    "otlp_endpoint": ("MODELFLEET_OTLP_ENDPOINT", str, None),
    "otlp_interval": ("MODELFLEET_OTLP_INTERVAL", float, 10.0),
}


def listen_address(value: object) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) as a pair; raises ValueError."""
    if not isinstance(value, str):
        raise ValueError(f"not HOST:PORT: {value!r}")
    host, sep, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"not HOST:PORT with a port 1-65535: {value!r}")
    return host, int(port)


def _flag(value: object) -> bool:
    """A boolean setting: true/false (TOML), or 1/0, true/false, yes/no (environment)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "0", "false", "no"):
        return value.lower() in ("1", "true", "yes")
    raise ValueError(f"not a boolean: {value!r}")


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

    Raises SettingsError naming the setting (and the file or variable) that is wrong.
    """
    env = os.environ if env is None else env
    out = {name: default for name, (_, _, default) in SETTINGS.items()}
    path = getattr(args, "config", None)
    if path is not None:
        try:
            doc = tomllib.loads(path.read_text())
        except OSError as exc:
            raise SettingsError(f"--config {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"--config {path}: not valid TOML: {exc}") from None
        for key, value in doc.items():
            name = key.replace("-", "_")
            if name not in SETTINGS:
                raise SettingsError(f"--config {path}: unknown setting {key!r}")
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
                "webhook_allow_private",
            )
        },
        "metrics_listen": _opt(args, "metrics_listen", listen_address),
        "otlp_endpoint": getattr(args, "otlp_endpoint", None),
        "otlp_interval": getattr(args, "otlp_interval", None),
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
        raise SettingsError(f"--{name.replace('_', '-')}: {exc}") from None


def _parse(name: str, value: object, where: str) -> Any:
    parser = SETTINGS[name][1]
    if parser in (int, float) and isinstance(value, bool):
        raise SettingsError(f"{where} must be a number")
    try:
        return parser(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{where} has a bad value: {value!r}") from None


def server_config(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> ServerConfig:
    """The checked ``ServerConfig`` of ``modelfleet server``; raises SettingsError naming it."""
    env = os.environ if env is None else env
    s = load_settings(args, env)
    try:
        telemetry = telemetry_config(
            endpoint=s["otlp_endpoint"],
            env=env,
            default_service="modelfleet-control-plane",
            export_interval_s=s["otlp_interval"],
        )
    except ValueError as exc:
        raise SettingsError(str(exc)) from None
    if not 0 < s["port"] < 65536:
        raise SettingsError(f"port must be 1-65535, got {s['port']}")
    if s["max_bundle_mb"] <= 0:
        raise SettingsError("max_bundle_mb must be positive")
    if not 0 < s["controller_interval"] <= 3600:
        raise SettingsError("controller_interval must be between 0 and 3600 seconds")
    if bool(s["tls_cert"]) != bool(s["tls_key"]):
        raise SettingsError("tls_cert and tls_key go together")
    if s["tls_client_ca"] and not s["tls_cert"]:
        raise SettingsError("tls_client_ca needs tls_cert and tls_key (mutual TLS is TLS first)")
    for name in ("tls_cert", "tls_key", "tls_client_ca"):
        if s[name] and not Path(s[name]).is_file():
            raise SettingsError(f"{name} {s[name]}: no such file")
    if not 0 <= s["rate_limit"] <= 1e6:
        raise SettingsError("rate_limit must be between 0 (off) and 1000000 requests per second")
    if not 0 < s["rollup_interval"] <= 86400:
        raise SettingsError("rollup_interval must be between 0 and 86400 seconds")
    _check_limits(s)
    retention = Retention(
        s["retain_raw"], s["retain_minutes"], s["retain_hours"], max(s["retain_minutes"], 86400.0)
    )
    try:
        retention.check()
    except ValueError as exc:
        raise SettingsError(f"retention: {exc}") from None
    if s["blob_store"]:
        from control_plane.catalog.blobstore import check_blob_store_url

        try:
            check_blob_store_url(s["blob_store"])
        except ValueError as exc:
            raise SettingsError(f"blob_store: {exc}") from None
    if s["mqtt"]:
        from control_plane.mqtt.bridge import broker_address

        try:
            broker_address(s["mqtt"])
        except ValueError as exc:
            raise SettingsError(f"mqtt: {exc}") from None
    for f in s["trust_publishers"]:
        if not f.is_file():
            raise SettingsError(f"trusted publisher key {f}: no such file")
    from control_plane.security.auth import (
        CREDENTIAL_COSTS,  # here: the agent's CLI must not load it
    )

    if s["credential_cost"] not in CREDENTIAL_COSTS:
        raise SettingsError(f"credential_cost: {s['credential_cost']} is not between 10 and 20")
    if s["keyset"] is not None and not s["keyset"].is_file():
        raise SettingsError(f"key set {s['keyset']}: no such file")
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
        webhook_allow_private=s["webhook_allow_private"],
        metrics_listen=s["metrics_listen"],
        telemetry=telemetry,
    )


def _check_limits(s: dict[str, Any]) -> None:
    """Raise SettingsError naming the connection, database or drain setting that is out of range."""
    from control_plane.security.netguard import ConnectionLimits

    try:
        ConnectionLimits(s["header_timeout"], s["keepalive_timeout"], s["max_connections"]).check()
    except ValueError as exc:
        raise SettingsError(str(exc).replace("_s ", " ", 1)) from None
    if not 0 <= s["refusal_rate"] <= 1e6:
        raise SettingsError("refusal_rate must be between 0 (off) and 1000000 per second")
    if s["db_pool_size"] is not None and not 1 <= s["db_pool_size"] <= 1000:
        raise SettingsError("db_pool_size must be between 1 and 1000")
    if not 0 < s["db_wait"] <= 600:
        raise SettingsError("db_wait must be between 0 and 600 seconds")
    if not 0 < s["drain"] <= 3600:
        raise SettingsError("drain must be between 0 and 3600 seconds")
