"""The agent's settings from the command line and ``agent.toml``: command line over file over
defaults. Only the command line module calls this; the daemon receives an AgentConfig.

``agent.toml`` (keys as the ``agent run`` options, with ``_`` or ``-``)::

    state_dir = "/var/lib/modelfleet"
    serve = "127.0.0.1:8510"
    trust_publisher = ["/etc/modelfleet/publishers/publisher.pub"]
    heartbeat = 15
    max_request_elements = 8388608   # inference limits: see `agent run --help`

    serve_token_file = "/etc/modelfleet/serve-tokens"   # inference port: bearer tokens
    serve_cert = "/etc/modelfleet/serve.crt"            # ... TLS, and mutual TLS with
    serve_key = "/etc/modelfleet/serve.key"
    serve_client_ca = "/etc/modelfleet/clients-ca.pem"  # ... serve_client_ca

    otlp_endpoint = "http://127.0.0.1:4318"   # OpenTelemetry over OTLP/HTTP (the otel extra)
    otlp_inference_sample = 0.01              # ... and 1% of inference requests traced

    [models."*"]                  # execution settings over every manifest's
    intra_op_threads = 2
    [models.resnet]               # ... and over those for one model
    max_batch_size = 8
    max_queue_delay_ms = 2
    preferred_batch_sizes = [4, 8]
    instances = 2
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    warmup_requests = 1

    [enroll]                      # used once, by `modelfleet agent enroll --config`
    server = "https://cp.example:8400"
    token = "mfe_..."
    name = "box-17"
    labels = "site=onprem,hw=cpu"
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from agent.config import AgentConfig
from agent.exceptions import AgentConfigError
from protocol.exceptions import InvalidMessage
from protocol.execution import Execution, parse_batching, parse_execution
from protocol.otlp import telemetry_config


def parse_rate(value: object) -> float:
    """``500k``, ``20M``, ``1G`` or a number of bytes per second; raises ValueError."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        rate = float(value)
    elif isinstance(value, str) and value:
        mult = {"k": 1e3, "m": 1e6, "g": 1e9}.get(value[-1:].lower(), 1.0)
        rate = float(value[:-1] if mult != 1.0 else value) * mult
    else:
        raise ValueError(f"not a rate: {value!r} (try 500k or 20M)")
    if rate <= 0:
        raise ValueError("a rate must be positive")
    return rate


def _positive(kind: type) -> Callable[[object], Any]:
    def check(v: object) -> Any:
        if isinstance(v, bool) or not isinstance(v, int | float) or v <= 0:
            raise ValueError("must be a positive number")
        return kind(v)

    return check


def _non_negative_int(v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError("must be a whole number >= 0")
    return v


def _non_negative_float(v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
        raise ValueError("must be a number >= 0")
    return float(v)


def _fraction(v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= 1:
        raise ValueError("must be between 0 and 1")
    return float(v)


def _string(v: object) -> str:
    if not isinstance(v, str) or not v:
        raise ValueError("must be a non-empty string")
    return v


def _transport(v: object) -> str:
    if v not in ("http", "mqtt", "auto"):
        raise ValueError("must be http, mqtt or auto")
    return str(v)


def _bool(v: object) -> bool:
    if not isinstance(v, bool):
        raise ValueError("must be true or false")
    return v


def _paths(v: object) -> list[Path]:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(p, str) and p for p in v):
        raise ValueError("must be a path or a list of paths")
    return [Path(p) for p in v]


# name -> (parser, default)
SETTINGS: dict[str, tuple[Callable[[object], Any], Any]] = {
    "state_dir": (lambda v: Path(_string(v)), None),
    "serve": (_string, "127.0.0.1:8510"),
    "trust_publisher": (_paths, []),
    "heartbeat": (_positive(float), 15.0),
    "poll_wait": (_positive(float), 30.0),
    "metrics_interval": (_positive(float), 10.0),
    "metrics_ack_timeout": (_positive(float), 30.0),
    "max_download_rate": (parse_rate, None),
    "ca": (_string, None),
    "client_cert": (_string, None),
    "client_key": (_string, None),
    "download_min_rate": (parse_rate, 16 * 1024.0),
    "max_concurrent_downloads": (_positive(int), 2),
    "disk_budget_mb": (_positive(float), None),
    "memory_limit_mb": (_positive(float), None),
    "keep_versions": (_non_negative_int, 1),
    "health_window": (_positive(float), 60.0),
    "health_max_error_rate": (_fraction, 0.2),
    "no_cuda": (_bool, False),
    "added_latency_ms": (lambda v: _non_negative_float(v), 0.0),
    "mqtt": (_string, None),
    "poll_interval": (_positive(float), 300.0),
    "keyset_refresh": (_positive(float), 300.0),
    "bundle_transport": (_transport, "http"),
    "mqtt_ca": (_string, None),
    # Inference limits and the serve port's connections: defaults are AgentConfig's.
    "max_request_mb": (_positive(float), AgentConfig.max_request_bytes / 2**20),
    "max_request_elements": (_positive(int), AgentConfig.max_request_elements),
    "max_response_elements": (_positive(int), AgentConfig.max_response_elements),
    "max_large_requests": (_positive(int), AgentConfig.max_large_requests),
    "header_timeout": (_positive(float), AgentConfig.header_timeout_s),
    "keepalive_timeout": (_positive(float), AgentConfig.keepalive_timeout_s),
    "body_timeout": (_positive(float), AgentConfig.body_timeout_s),
    "max_connections": (_positive(int), AgentConfig.max_connections),
    # gRPC OIP: off unless an address is given.
    "grpc": (_string, None),
    "grpc_token_file": (_string, None),
    "grpc_cert": (_string, None),
    "grpc_key": (_string, None),
    "grpc_client_ca": (_string, None),
    # The inference port's access: a file of bearer tokens (one a line), TLS, mutual TLS.
    "serve_token_file": (_string, None),
    "serve_cert": (_string, None),
    "serve_key": (_string, None),
    "serve_client_ca": (_string, None),
    # OTLP export (also on with the standard OTEL_EXPORTER_OTLP_ENDPOINT; protocol/otlp.py).
    "otlp_endpoint": (_string, None),
    "otlp_interval": (_positive(float), 10.0),
    "otlp_inference_sample": (_fraction, 0.0),
}
# agent.toml's [models.NAME] keys -> the manifest's execution names (protocol/execution.py).
MODEL_KEYS = {
    "instances": "instances",
    "intra_op_threads": "intraOpThreads",
    "inter_op_threads": "interOpThreads",
    "providers": "providers",
    "warmup_requests": "warmupRequests",
    "litert_threads": "litertThreads",
}
BATCHING_KEYS = {
    "max": "max_batch_size",
    "delay": "max_queue_delay_ms",
    "preferred": "preferred_batch_sizes",
}


def parse_models(doc: object, where: str) -> dict[str, Execution]:
    """agent.toml's [models.NAME] tables; raises AgentConfigError naming the key."""
    if not isinstance(doc, dict):
        raise AgentConfigError(f"{where}: [models] must hold one table per model")
    out = {}
    for name, table in doc.items():
        field = f"models.{name}"
        if not isinstance(table, dict):
            raise AgentConfigError(f"{where}: [{field}] must be a table")
        unknown = set(table) - set(MODEL_KEYS) - set(BATCHING_KEYS.values())
        if unknown:
            raise AgentConfigError(f"{where}: [{field}] does not take {sorted(unknown)[0]!r}")
        execution = {MODEL_KEYS[k]: v for k, v in table.items() if k in MODEL_KEYS}
        batching = {k: v for k, v in table.items() if k in BATCHING_KEYS.values()}
        try:
            parsed = parse_execution(execution, field)
            if batching:
                parsed = Execution(batching=parse_batching(batching, field, BATCHING_KEYS)).over(
                    parsed
                )
        except InvalidMessage as exc:
            raise AgentConfigError(f"{where}: {exc}") from None
        out[name] = parsed
    return out


ENROLL_KEYS = {"server", "token", "name", "labels"}


def load_file(path: Path) -> dict[str, Any]:
    """Read agent.toml; raises AgentConfigError naming the file and what is wrong."""
    try:
        doc = tomllib.loads(path.read_text())
    except OSError as exc:
        raise AgentConfigError(f"{path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise AgentConfigError(f"{path}: not valid TOML: {exc}") from None
    out: dict[str, Any] = {}
    for key, value in doc.items():
        name = key.replace("-", "_")
        if name == "models":
            out["models"] = parse_models(value, str(path))
            continue
        if name == "enroll":
            if not isinstance(value, dict) or set(value) - ENROLL_KEYS:
                bad = sorted(set(value) - ENROLL_KEYS) if isinstance(value, dict) else ["enroll"]
                raise AgentConfigError(f"{path}: [enroll] does not take {bad[0]!r}")
            out["enroll"] = value
            continue
        if name not in SETTINGS:
            raise AgentConfigError(f"{path}: unknown setting {key!r}")
        try:
            out[name] = SETTINGS[name][0](value)
        except ValueError as exc:
            raise AgentConfigError(f"{path}: {key} {exc}") from None
    return out


def merge(cli: Mapping[str, Any], file: Mapping[str, Any]) -> dict[str, Any]:
    """Command line (values that are not None) over file over defaults."""
    out = {name: default for name, (_, default) in SETTINGS.items()}
    out.update({k: v for k, v in file.items() if k in SETTINGS or k == "models"})
    for name in SETTINGS:
        value = cli.get(name)
        if value is not None and value != []:
            out[name] = value
    return out


def serve_address(text: str, option: str = "serve") -> tuple[str, int]:
    """``HOST:PORT``; raises ValueError."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"--{option} ({option}) must be HOST:PORT, got {text!r}")
    return host, int(port)


def read_tokens(path: str, option: str = "grpc-token-file") -> tuple[str, ...]:
    """The bearer tokens in a file, one a line (blank lines and ``#`` comments skipped);
    raises AgentConfigError (naming ``option``) when it cannot be read or holds none."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise AgentConfigError(f"{option} {path}: {exc}") from None
    tokens = tuple(
        line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")
    )
    if not tokens:
        raise AgentConfigError(f"{option} {path}: holds no token")
    if any(len(t) < 16 or not t.isascii() or not t.isprintable() for t in tokens):
        raise AgentConfigError(
            f"{option} {path}: every token must be 16 or more printable ASCII characters"
        )
    return tokens


def _grpc(s: Mapping[str, Any]) -> dict[str, Any]:
    """The gRPC fields of AgentConfig; raises AgentConfigError."""
    if s["grpc"] is None:
        return {}
    try:
        host, port = serve_address(s["grpc"], "grpc")
    except ValueError as exc:
        raise AgentConfigError(str(exc)) from None
    if (s["grpc_cert"] is None) != (s["grpc_key"] is None):
        raise AgentConfigError("grpc-cert and grpc-key go together")
    if s["grpc_client_ca"] is not None and s["grpc_cert"] is None:
        raise AgentConfigError("grpc-client-ca needs grpc-cert and grpc-key (mutual TLS)")
    tokens = read_tokens(s["grpc_token_file"]) if s["grpc_token_file"] else ()
    return {
        "grpc_host": host,
        "grpc_port": port,
        "grpc_tokens": tokens,
        "grpc_cert_file": s["grpc_cert"],
        "grpc_key_file": s["grpc_key"],
        "grpc_client_ca_file": s["grpc_client_ca"],
    }


def to_config(
    s: Mapping[str, Any], failpoints: tuple[str, ...] = (), env: Mapping[str, str] | None = None
) -> AgentConfig:
    """Settings to the daemon's config; ``env``: the standard ``OTEL_*`` variables (the
    command line passes its environment). Raises AgentConfigError for a bad value."""
    if s["state_dir"] is None:
        raise AgentConfigError("no state directory: pass --state-dir or set state_dir")
    if bool(s["serve_cert"]) != bool(s["serve_key"]):
        raise AgentConfigError("TLS on the serve port needs both serve_cert and serve_key")
    if s["serve_client_ca"] and not s["serve_cert"]:
        raise AgentConfigError("serve_client_ca (mutual TLS) needs serve_cert and serve_key")
    for name in SETTINGS:
        if name in ("state_dir", "trust_publisher", "serve", "grpc") or s[name] is None:
            continue
        try:
            SETTINGS[name][0](s[name])
        except ValueError as exc:
            raise AgentConfigError(f"{name.replace('_', '-')} {exc}") from None
    try:
        host, port = serve_address(s["serve"])
    except ValueError as exc:
        raise AgentConfigError(str(exc)) from None
    budget = s["disk_budget_mb"]
    memory = s["memory_limit_mb"]
    try:
        telemetry = telemetry_config(
            endpoint=s["otlp_endpoint"],
            env=env or {},
            default_service="modelfleet-agent",
            export_interval_s=s["otlp_interval"],
            inference_sample=s["otlp_inference_sample"],
        )
    except ValueError as exc:
        raise AgentConfigError(str(exc)) from None
    return AgentConfig(
        state_dir=Path(s["state_dir"]),
        serve_host=host,
        serve_port=port,
        trusted_publisher_files=tuple(Path(p) for p in s["trust_publisher"]),
        heartbeat_s=s["heartbeat"],
        poll_wait_s=s["poll_wait"],
        metrics_interval_s=s["metrics_interval"],
        metrics_ack_timeout_s=s["metrics_ack_timeout"],
        max_download_rate=s["max_download_rate"],
        download_min_rate=s["download_min_rate"],
        max_concurrent_downloads=s["max_concurrent_downloads"],
        disk_budget_bytes=int(budget * 1024 * 1024) if budget else None,
        memory_limit_bytes=int(memory * 1024 * 1024) if memory else None,
        keep_versions=s["keep_versions"],
        health_window_s=s["health_window"],
        health_max_error_rate=s["health_max_error_rate"],
        allow_cuda=not s["no_cuda"],
        failpoints=failpoints,
        added_latency_s=s["added_latency_ms"] / 1000.0,
        mqtt_url=s["mqtt"],
        poll_interval_s=s["poll_interval"],
        keyset_refresh_s=s["keyset_refresh"],
        bundle_transport=s["bundle_transport"],
        mqtt_ca_file=s["mqtt_ca"],
        ca_file=s["ca"],
        client_cert_file=s["client_cert"],
        client_key_file=s["client_key"],
        max_request_bytes=int(s["max_request_mb"] * 1024 * 1024),
        max_request_elements=s["max_request_elements"],
        max_response_elements=s["max_response_elements"],
        max_large_requests=s["max_large_requests"],
        header_timeout_s=s["header_timeout"],
        keepalive_timeout_s=s["keepalive_timeout"],
        body_timeout_s=s["body_timeout"],
        max_connections=s["max_connections"],
        **_grpc(s),
        model_execution=dict(s.get("models") or {}),
        serve_tokens=(
            read_tokens(s["serve_token_file"], "serve-token-file") if s["serve_token_file"] else ()
        ),
        serve_cert_file=s["serve_cert"],
        serve_key_file=s["serve_key"],
        serve_client_ca_file=s["serve_client_ca"],
        telemetry=telemetry,
    )
