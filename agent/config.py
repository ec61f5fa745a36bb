"""Typed configuration of the agent; only the command line reads env and files."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from protocol.execution import Execution
from protocol.otlp import TelemetryConfig


@dataclass(frozen=True)
class AgentConfig:
    """Everything the agent daemon needs, with named defaults."""

    state_dir: Path
    serve_host: str = "127.0.0.1"
    serve_port: int = 8510
    trusted_publisher_files: tuple[Path, ...] = ()
    heartbeat_s: float = 15.0
    poll_wait_s: float = 30.0
    metrics_interval_s: float = 10.0
    # A batch published over MQTT and not acknowledged by the control plane within this long
    # is sent again (a broker can lose what it holds in flight, or while no replica listens).
    metrics_ack_timeout_s: float = 30.0
    max_pending_batches: int = 10_000  # on-disk buffer; the oldest go first beyond this
    inference_threads: int = max(2, os.cpu_count() or 2)
    allow_cuda: bool = True
    drain_s: float = 10.0
    # Updates: a new version is on probation for health_window_s after it takes traffic.
    health_window_s: float = 60.0
    health_max_error_rate: float = 0.2
    health_min_requests: int = 20
    keep_versions: int = 1  # old versions kept on disk per model, for rollback
    # Downloads.
    max_concurrent_downloads: int = 2
    max_download_rate: float | None = None  # bytes per second, all downloads together
    download_attempts: int = 5
    # Slow retrieval: an attempt must average at least download_min_rate bytes per second
    # after download_grace_s, else it is abandoned (and resumed, up to download_attempts).
    download_min_rate: float = 16 * 1024.0
    download_grace_s: float = 30.0
    disk_budget_bytes: int | None = None  # None: only the free space of the disk counts
    # Memory the loaded models may take together (weights counted once per loaded version);
    # None: only what the host reports available counts. Also simulates a small host.
    memory_limit_bytes: int | None = None
    failpoints: tuple[str, ...] = ()
    # Demos and tests: an artificial delay on every inference, to stand for a slower machine.
    added_latency_s: float = 0.0
    # MQTT push: a broker URL overriding the one enrollment handed out; while connected, the
    # HTTP fallback polls every poll_interval_s instead of long-polling.
    mqtt_url: str | None = None
    mqtt_ca_file: str | None = None  # for mqtts://
    # https:// control planes: a custom CA to verify them, and a client certificate (mTLS).
    ca_file: str | None = None
    client_cert_file: str | None = None
    client_key_file: str | None = None
    poll_interval_s: float = 300.0
    # How often to look for a newer signed key set (also done before verifying a new
    # version's manifest, and when a desired state is signed by a key not yet trusted).
    keyset_refresh_s: float = 300.0
    # Where blobs come from: "http" (ranged, resumable; the default), "mqtt" (chunks by
    # request/response through the broker), or "auto" (HTTP, then MQTT when HTTP fails).
    bundle_transport: str = "http"
    # Inference limits (agent/serving/app.py): a request body over max_request_bytes, or whose
    # shapes add up to more than max_request_elements, is answered 413 before its arrays are
    # built; an answer over max_response_elements is answered 413 before it is encoded.
    max_request_bytes: int = 64 * 1024 * 1024
    max_request_elements: int = 1 << 23  # 8 Mi values: 32 MiB of FP32
    max_response_elements: int = 1 << 23
    # Bodies over inline_json_bytes are decoded (and answers over inline_json_elements
    # encoded) in a worker thread, in pieces that let the event loop run; at most
    # max_large_requests such requests are handled at once, the others wait (see
    # docs/adr/0010-agent-inference-limits.md).
    inline_json_bytes: int = 128 * 1024
    inline_json_elements: int = 4096
    max_large_requests: int = 1
    # JSON bodies up to json_thread_max_bytes (and JSON answers up to json_thread_max_elements
    # values) are decoded (encoded) by orjson in one go in a worker thread, which holds the GIL
    # ~3 ms per MiB; only larger ones take the piecewise path and its slot. Request bodies
    # held at once, of any size, add up to at most body_budget_bytes (the others wait, unread).
    # See docs/adr/0020-rest-data-plane.md.
    json_thread_max_bytes: int = 32 * 1024 * 1024
    json_thread_max_elements: int = 1 << 21
    body_budget_bytes: int = 256 * 1024 * 1024
    # The serve port's connections (agent/netguard.py): a request's headers must arrive within
    # header_timeout_s of its first byte (or of the connection), an idle keep-alive connection
    # is closed after keepalive_timeout_s, connections beyond max_connections are refused with
    # 503, and a body (with the wait for a large-request slot) or a streamed answer must be
    # through within body_timeout_s.
    header_timeout_s: float = 10.0
    keepalive_timeout_s: float = 15.0
    body_timeout_s: float = 60.0
    max_connections: int = 256
    # gRPC OIP (agent/serving/grpc.py): off while grpc_host is None. With grpc_tokens, every
    # call must carry one of them as a bearer token; with a certificate and key the port speaks
    # TLS, and with a client CA as well it asks every client for a certificate (mutual TLS).
    grpc_host: str | None = None
    grpc_port: int = 8511
    grpc_tokens: tuple[str, ...] = ()
    grpc_cert_file: str | None = None
    grpc_key_file: str | None = None
    grpc_client_ca_file: str | None = None
    # Per-model execution settings over the manifests' (agent.toml [models.NAME]; "*" for every
    # model, under a model's own): batching, sessions, threads, providers, warm-up. Taken
    # when a version loads.
    model_execution: Mapping[str, Execution] = field(default_factory=dict)
    # The inference port's access (agent/serving/access.py): bearer tokens (any of them
    # admits), and TLS with a client CA for mutual TLS. Health probes stay open.
    serve_tokens: tuple[str, ...] = ()
    serve_cert_file: str | None = None
    serve_key_file: str | None = None
    serve_client_ca_file: str | None = None
    # OpenTelemetry: traces and metrics exported over OTLP/HTTP (None: off, nothing of
    # OpenTelemetry imported; docs/adr/0023-opentelemetry.md).
    telemetry: TelemetryConfig | None = None
