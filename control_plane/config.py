"""Typed configuration of the control plane; only the command line reads env and files."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from protocol.otlp import TelemetryConfig

MiB = 1024 * 1024


@dataclass(frozen=True)
class Retention:
    """How long each tier is kept, in seconds."""

    raw_s: float = 6 * 3600.0
    minute_s: float = 7 * 86400.0
    hour_s: float = 400 * 86400.0
    batches_s: float = 7 * 86400.0

    def check(self) -> None:
        """Raise ValueError unless every tier outlives the one it is rolled up from."""
        if min(self.raw_s, self.minute_s, self.hour_s, self.batches_s) <= 0:
            raise ValueError("retention periods must be positive")
        if not self.raw_s <= self.minute_s <= self.hour_s:
            raise ValueError("retention must grow from raw to minute to hour")


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``create_app`` needs; defaults are the embedded single-replica setup."""

    data_dir: Path
    db_url: str | None = None  # None: SQLite at <data_dir>/modelfleet.db
    host: str = "127.0.0.1"
    port: int = 8400
    trusted_publisher_files: tuple[Path, ...] = ()
    signing_key_file: Path | None = None  # None: <data_dir>/control-plane.key
    keyset_file: Path | None = None  # a signed key set to install at start (protocol/keyset.py)
    credential_cost: int = 12  # log2 of scrypt's N for agent credentials (security/auth.py)
    max_bundle_bytes: int = 512 * MiB
    max_json_bytes: int = 1 * MiB
    long_poll_max_s: float = 60.0
    long_poll_recheck_s: float = 5.0  # re-read the database so changes by other replicas wake us
    desired_ttl_s: float = 7 * 24 * 3600.0
    offline_after_s: float = 60.0
    heartbeat_s: float = 15.0
    enrollment_token_ttl_s: float = 24 * 3600.0
    controller_interval_s: float = 1.0  # how often the rollout controller looks at rollouts
    # MQTT: the broker this control plane publishes desired state to and reads reports from.
    mqtt_url: str | None = None  # mqtt://host:port; None: HTTP only
    mqtt_public_url: str | None = None  # what agents are told to dial (default: mqtt_url)
    mqtt_username: str = "modelfleet-control-plane"
    mqtt_password: str | None = None
    mqtt_prefix: str = "modelfleet/v1"
    mqtt_ca_file: str | None = None  # for mqtts://: the CA that signed the broker's certificate
    # Metric roll-ups (metrics/rollup.py): how long each tier is kept, how often to run.
    retention: Retention = field(default_factory=Retention)
    rollup_interval_s: float = 60.0
    # Blobs: None = the directory <data_dir>/blobs (shared by replicas when it is on shared
    # storage); a path = that directory; s3://bucket/prefix = an S3-compatible object store.
    blob_store_url: str | None = None
    # Requests per second per API token or agent credential (0: no limit), and the burst.
    rate_limit_per_s: float = 50.0
    rate_limit_burst: float = 200.0
    # HTTPS: certificate and key; with a client CA, mutual TLS (every client shows a cert).
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_client_ca_file: str | None = None
    # Connections (control_plane/security/netguard.py): a request head must arrive within
    # header_timeout_s, an idle kept-alive connection closes after keepalive_timeout_s, a
    # JSON body must arrive within body_timeout_s, and at most max_connections are open (an
    # HTTP agent holds up to two: its long-poll and a report; an MQTT agent none).
    header_timeout_s: float = 10.0
    keepalive_timeout_s: float = 30.0
    body_timeout_s: float = 30.0
    max_connections: int = 4096
    # Unauthenticated refusals (401, and 4xx on public routes such as enroll) per second per
    # source address, and the burst; past them the source gets 429 (0: no limit).
    refusal_rate_per_s: float = 10.0
    refusal_burst: float = 100.0
    # Refusals repeated by one source within this many seconds share one audit row.
    audit_coalesce_s: float = 60.0
    # Database sessions open at once in this process (the pool's size), and how long a
    # request waits for one before it is answered 503 with Retry-After.
    db_pool_size: int | None = None  # None: 15 on SQLite, 30 on PostgreSQL
    db_wait_s: float = 10.0
    # SIGTERM: seconds from the signal to exit, whatever is open (long-polls are answered
    # at once, in-flight requests get part of it, then background tasks stop).
    drain_s: float = 10.0
    # Webhooks (control_plane/events/): receivers on loopback or private addresses only when
    # allowed; one attempt's timeout; attempts per delivery and the first retry's delay.
    webhook_allow_private: bool = False
    webhook_timeout_s: float = 10.0
    webhook_max_attempts: int = 8
    webhook_retry_base_s: float = 5.0
    # Operator commands to agents (fleet/commands.py): answers are kept this long after they
    # arrive (expired commands as long after their expiry), and an agent has at most this
    # many commands waiting at once.
    command_retention_s: float = 3600.0
    max_pending_commands: int = 8
    # GET /metrics also on this address, without authentication (None: only on the API port,
    # with a fleet:read token).
    metrics_listen: tuple[str, int] | None = None
    # OpenTelemetry: traces and metrics exported over OTLP/HTTP (None: off, nothing of
    # OpenTelemetry imported; docs/adr/0023-opentelemetry.md).
    telemetry: TelemetryConfig | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def database_url(self) -> str:
        """The database URL, defaulting to SQLite in the data directory."""
        return self.db_url or f"sqlite+aiosqlite:///{self.data_dir / 'modelfleet.db'}"

    @property
    def blob_dir(self) -> Path:
        """Where the content-addressed blobs live."""
        return self.data_dir / "blobs"
