"""Tables of the control plane. The schema itself is created by Alembic (migrations/)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.sql.expression import false
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    """Aware UTC now."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timestamps stored in UTC and always read back aware (SQLite keeps no zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    """Declarative base; JSON columns map to JSON on SQLite and PostgreSQL alike."""

    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, datetime: UTCDateTime}


class Model(Base):
    """A named model; versions hang off it."""

    __tablename__ = "models"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    versions: Mapped[list[ModelVersion]] = relationship(back_populates="model")


class ModelVersion(Base):
    """One published, verified version of a model."""

    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("model_id", "version", name="uq_model_versions_version"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    version: Mapped[str] = mapped_column(String(64))
    manifest_digest: Mapped[str] = mapped_column(String(71), unique=True)
    manifest: Mapped[dict[str, Any]] = mapped_column(JSON)
    envelope: Mapped[str] = mapped_column(Text)
    runtime: Mapped[str] = mapped_column(String(32))
    size: Mapped[int] = mapped_column(BigInteger)
    publisher_keyids: Mapped[list[Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    model: Mapped[Model] = relationship(back_populates="versions")


class Blob(Base):
    """A content-addressed file in the blob store."""

    __tablename__ = "blobs"
    digest: Mapped[str] = mapped_column(String(71), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    media_type: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ApiToken(Base):
    """An operator's bearer token, stored as the sha256 of the secret."""

    __tablename__ = "api_tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[list[Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class EnrollmentToken(Base):
    """A token that lets a limited number of agents enroll, until it expires."""

    __tablename__ = "enrollment_tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    labels: Mapped[dict[str, Any]] = mapped_column(JSON)
    max_uses: Mapped[int] = mapped_column(Integer)
    uses: Mapped[int] = mapped_column(Integer, default=0)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Agents enrolled with it wait as "pending" until an operator approves them.
    require_approval: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # The labels it grants are locked on the agents it enrolls: relabel cannot change them.
    lock_labels: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class Agent(Base):
    """An enrolled agent and the last status it reported."""

    __tablename__ = "agents"
    __table_args__ = (
        UniqueConstraint("next_credential_hash", name="uq_agents_next_credential_hash"),
    )
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    labels: Mapped[dict[str, Any]] = mapped_column(JSON)
    facts: Mapped[dict[str, Any]] = mapped_column(JSON)
    # scrypt of the credential (control_plane/security/auth.py), found by its lookup key.
    credential_hash: Mapped[str] = mapped_column(String(128), unique=True)
    credential_lookup: Mapped[str | None] = mapped_column(
        String(16), nullable=True, index=True, unique=True
    )
    enrolled_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_seen_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    reported_generation: Mapped[int] = mapped_column(BigInteger, default=0)
    status: Mapped[dict[str, Any]] = mapped_column(JSON)
    # The agent's own order of the report ``status`` came from: a report is stored only when
    # newer (control_plane/fleet/status_order.py). (0, 0) and no time: none stored yet, or old rows.
    status_epoch: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    status_seq: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    status_sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    mqtt_password_hash: Mapped[str | None] = mapped_column(String(255), nullable=True)
    # Rotation: a new credential valid beside the old one until its first use retires the old.
    next_credential_hash: Mapped[str | None] = mapped_column(String(128), nullable=True)
    next_credential_lookup: Mapped[str | None] = mapped_column(
        String(16), nullable=True, index=True, unique=True
    )
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # Enrolled with a token that requires approval, and not approved yet: no desired state, no
    # place in rollouts, no downloads.
    pending: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # Label keys an enrollment token pinned and locked: relabel refuses to change them.
    locked_labels: Mapped[list[Any]] = mapped_column(JSON, default=list, server_default="[]")


class Rollout(Base):
    """A model version targeted at the agents a selector matches."""

    __tablename__ = "rollouts"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    model_version_id: Mapped[int] = mapped_column(
        ForeignKey("model_versions.id", ondelete="RESTRICT"), index=True
    )
    selector: Mapped[dict[str, Any]] = mapped_column(JSON)
    stages: Mapped[list[Any]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(32), index=True)
    options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict, server_default="{}")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    stage_index: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    soak_started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    promoted: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    gate_results: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict, server_default="{}")
    model_version: Mapped[ModelVersion] = relationship()


class RolloutTarget(Base):
    """An agent a rollout has moved to its version, and when."""

    __tablename__ = "rollout_targets"
    rollout_id: Mapped[str] = mapped_column(
        ForeignKey("rollouts.id", ondelete="CASCADE"), primary_key=True
    )
    agent_id: Mapped[str] = mapped_column(
        ForeignKey("agents.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    stage: Mapped[int] = mapped_column(Integer)
    moved_at: Mapped[datetime] = mapped_column(UTCDateTime)


class RolloutEvent(Base):
    """One entry of a rollout's timeline: a transition, its reason and its figures."""

    __tablename__ = "rollout_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    rollout_id: Mapped[str] = mapped_column(
        ForeignKey("rollouts.id", ondelete="CASCADE"), index=True
    )
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    kind: Mapped[str] = mapped_column(String(32))
    stage: Mapped[int | None] = mapped_column(Integer, nullable=True)
    reason: Mapped[str] = mapped_column(Text)
    figures: Mapped[dict[str, Any]] = mapped_column(JSON)


class ConfigLayer(Base):
    """One configuration layer of one model: fleet, selector or agent scope
    (control_plane/fleet/config.py says how layers merge)."""

    __tablename__ = "config_layers"
    __table_args__ = (UniqueConstraint("model", "target", name="uq_config_layers_target"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(128), index=True)
    scope: Mapped[str] = mapped_column(String(16))
    # What the layer is for, one string per (model, target): "fleet", "selector:<selector>",
    # "agent:<id>", "rollout:<id>".
    target: Mapped[str] = mapped_column(String(1100))
    selector: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    agent_id: Mapped[str | None] = mapped_column(
        ForeignKey("agents.id", ondelete="CASCADE"), nullable=True, index=True
    )
    rollout_id: Mapped[str | None] = mapped_column(
        ForeignKey("rollouts.id", ondelete="CASCADE"), nullable=True, index=True
    )
    values: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class DesiredStateRow(Base):
    """The current signed desired state of one agent; generation only grows."""

    __tablename__ = "desired_states"
    agent_id: Mapped[str] = mapped_column(
        ForeignKey("agents.id", ondelete="CASCADE"), primary_key=True
    )
    generation: Mapped[int] = mapped_column(BigInteger)
    document: Mapped[dict[str, Any]] = mapped_column(JSON)
    envelope: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class MetricBatch(Base):
    """One metrics batch, stored once per (agent, seq)."""

    __tablename__ = "metric_batches"
    agent_id: Mapped[str] = mapped_column(
        ForeignKey("agents.id", ondelete="CASCADE"), primary_key=True
    )
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    window_start: Mapped[datetime] = mapped_column(UTCDateTime)
    window_end: Mapped[datetime] = mapped_column(UTCDateTime, index=True)  # retention deletes
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class MetricSeries(Base):
    """Counts and latency sketch of one model version within one batch."""

    __tablename__ = "metric_series"
    __table_args__ = (
        Index("ix_metric_series_model_version_window", "model", "version", "window_start"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    agent_id: Mapped[str] = mapped_column(String(36), index=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    model: Mapped[str] = mapped_column(String(128))
    version: Mapped[str] = mapped_column(String(64))
    window_start: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    window_end: Mapped[datetime] = mapped_column(UTCDateTime)
    requests: Mapped[int] = mapped_column(BigInteger)
    errors: Mapped[int] = mapped_column(BigInteger)
    latency_sketch: Mapped[dict[str, Any]] = mapped_column(JSON)
    shadow_count: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    drift_sum: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    argmax_agree: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


class MetricRollup(Base):
    """Metric series of one agent and model version merged over a minute or an hour.

    Raw series older than the raw retention are merged into minute rows, minute rows into hour
    rows, and hour rows are dropped after theirs (control_plane/metrics/rollup.py), so the metric
    tables stay bounded however long a fleet runs.
    """

    __tablename__ = "metric_rollups"
    __table_args__ = (
        UniqueConstraint(
            "resolution_s",
            "agent_id",
            "model",
            "version",
            "bucket_start",
            name="uq_metric_rollups_bucket",
        ),
        Index("ix_metric_rollups_model_bucket", "model", "bucket_start"),
        Index("ix_metric_rollups_resolution_bucket", "resolution_s", "bucket_start"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    resolution_s: Mapped[int] = mapped_column(Integer)
    bucket_start: Mapped[datetime] = mapped_column(UTCDateTime)
    agent_id: Mapped[str] = mapped_column(String(36))
    model: Mapped[str] = mapped_column(String(128))
    version: Mapped[str] = mapped_column(String(64))
    requests: Mapped[int] = mapped_column(BigInteger)
    errors: Mapped[int] = mapped_column(BigInteger)
    latency_sketch: Mapped[dict[str, Any]] = mapped_column(JSON)
    shadow_count: Mapped[int] = mapped_column(BigInteger, default=0)
    drift_sum: Mapped[float] = mapped_column(Float, default=0.0)
    argmax_agree: Mapped[int] = mapped_column(BigInteger, default=0)


class MetricSetAside(Base):
    """A stored metric row the roll-up could not merge, moved out of the way with its reason.

    Kept as text, never read back into a tier; dropped with the hour tier's retention
    (control_plane/metrics/rollup.py).
    """

    __tablename__ = "metric_set_aside"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    set_aside_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    source: Mapped[str] = mapped_column(String(32))  # metric_series or metric_rollups/60s
    source_id: Mapped[int] = mapped_column(BigInteger)
    agent_id: Mapped[str] = mapped_column(String(36), index=True)
    model: Mapped[str] = mapped_column(String(128))
    version: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(Text)
    row: Mapped[str] = mapped_column(Text)  # the row as it was, as JSON text where it can be


class AuditEvent(Base):
    """One entry of the append-only audit log; each row's hash covers the previous row's.

    ``hash = sha256(prev_hash + canonical JSON of the row)`` (security/audit.py), so an
    edited or deleted row breaks the chain from there on; ``modelfleet audit verify`` checks it.
    """

    __tablename__ = "audit_events"
    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(200))
    target: Mapped[str] = mapped_column(String(500))
    outcome: Mapped[int] = mapped_column(Integer)
    remote: Mapped[str] = mapped_column(String(100))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64), unique=True)


class KeySetRow(Base):
    """One version of the signed key set (protocol/keyset.py); versions only go up by one."""

    __tablename__ = "keysets"
    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    envelope: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class OutboxEvent(Base):
    """An event for webhooks (control_plane/events/), written in the transaction of its change.

    The delivery loop fans each one out to the endpoints that subscribe to its type
    (``dispatched`` then becomes true) and drops it after the delivery log's retention.
    """

    __tablename__ = "outbox_events"
    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    event_id: Mapped[str] = mapped_column(String(36), unique=True)
    type: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str] = mapped_column(String(200))
    at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    dispatched: Mapped[bool] = mapped_column(Boolean, default=False, index=True)


class WebhookEndpoint(Base):
    """A receiver of events: its URL, the event types it wants, and the secret that signs."""

    __tablename__ = "webhook_endpoints"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    url: Mapped[str] = mapped_column(String(2048))
    events: Mapped[list[Any]] = mapped_column(JSON)  # type patterns: rollout.*, agent.offline
    # Kept as given: HMAC needs the secret itself (shown once at creation, never listed).
    secret: Mapped[str] = mapped_column(String(128))
    description: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class WebhookDelivery(Base):
    """One event owed to one endpoint, and its log: attempts, last answer, when it is due."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index("ix_webhook_deliveries_due", "state", "next_attempt_at"),
        Index("ix_webhook_deliveries_endpoint", "endpoint_id", "id"),
    )
    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    endpoint_id: Mapped[str] = mapped_column(ForeignKey("webhook_endpoints.id", ondelete="CASCADE"))
    event_id: Mapped[str] = mapped_column(String(36))
    type: Mapped[str] = mapped_column(String(64))
    body: Mapped[str] = mapped_column(Text)  # the exact bytes signed and sent
    state: Mapped[str] = mapped_column(String(16))  # pending, delivered, failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # A replica that claims it holds it until then; past it another may (it died mid-send).
    claimed_until: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_error: Mapped[str | None] = mapped_column(String(500), nullable=True)
    log: Mapped[list[Any]] = mapped_column(JSON)  # one entry per attempt: at, status, error, ms
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class EventMark(Base):
    """A fact already announced (an agent offline since a given time, a failed activation of a
    digest), so a fact that persists is announced once, whichever replica sees it."""

    __tablename__ = "event_marks"
    key: Mapped[str] = mapped_column(String(300), primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class AgentCommand(Base):
    """An operator's command to one agent (protocol/commands.py) and, once it came, its answer.

    ``state``: pending (not handed to the agent yet), delivered, answered, failed (the agent
    said it could not), expired. Rows go ``command_retention_s`` after their answer or expiry.
    """

    __tablename__ = "agent_commands"
    __table_args__ = (Index("ix_agent_commands_agent_state", "agent_id", "state"),)
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    agent_id: Mapped[str] = mapped_column(ForeignKey("agents.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16))
    envelope: Mapped[str] = mapped_column(Text)  # the signed command, as sent
    since_s: Mapped[int] = mapped_column(Integer)
    max_bytes: Mapped[int] = mapped_column(Integer)
    issued_by: Mapped[str] = mapped_column(String(200))
    issued_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    state: Mapped[str] = mapped_column(String(16))
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    delivered_via: Mapped[str | None] = mapped_column(String(8), nullable=True)
    answered_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    answered_via: Mapped[str | None] = mapped_column(String(8), nullable=True)
    answer: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    answer_digest: Mapped[str | None] = mapped_column(String(71), nullable=True)
    error: Mapped[str | None] = mapped_column(String(500), nullable=True)
