"""Initial schema: registry, blobs, tokens, agents, rollouts, desired state, metrics.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _ts(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "models",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(128), nullable=False, unique=True),
        _ts("created_at"),
    )
    op.create_table(
        "model_versions",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column(
            "model_id",
            sa.Integer(),
            sa.ForeignKey("models.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("manifest_digest", sa.String(71), nullable=False, unique=True),
        sa.Column("manifest", sa.JSON(), nullable=False),
        sa.Column("envelope", sa.Text(), nullable=False),
        sa.Column("runtime", sa.String(32), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("publisher_keyids", sa.JSON(), nullable=False),
        _ts("created_at"),
        sa.UniqueConstraint("model_id", "version", name="uq_model_versions_version"),
    )
    op.create_index("ix_model_versions_model_id", "model_versions", ["model_id"])
    op.create_table(
        "blobs",
        sa.Column("digest", sa.String(71), primary_key=True),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("media_type", sa.String(255), nullable=False),
        _ts("created_at"),
    )
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("scopes", sa.JSON(), nullable=False),
        _ts("created_at"),
    )
    op.create_table(
        "enrollment_tokens",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("max_uses", sa.Integer(), nullable=False),
        sa.Column("uses", sa.Integer(), nullable=False),
        _ts("expires_at"),
        _ts("created_at"),
    )
    op.create_table(
        "agents",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("facts", sa.JSON(), nullable=False),
        sa.Column("credential_hash", sa.String(64), nullable=False, unique=True),
        _ts("enrolled_at"),
        _ts("last_seen_at", nullable=True),
        sa.Column("reported_generation", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.JSON(), nullable=False),
    )
    op.create_table(
        "rollouts",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column(
            "model_version_id",
            sa.Integer(),
            sa.ForeignKey("model_versions.id", ondelete="RESTRICT"),
            nullable=False,
        ),
        sa.Column("selector", sa.JSON(), nullable=False),
        sa.Column("stages", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        _ts("created_at"),
        _ts("updated_at"),
    )
    op.create_index("ix_rollouts_model_version_id", "rollouts", ["model_version_id"])
    op.create_index("ix_rollouts_state", "rollouts", ["state"])
    op.create_table(
        "desired_states",
        sa.Column(
            "agent_id",
            sa.String(36),
            sa.ForeignKey("agents.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("generation", sa.BigInteger(), nullable=False),
        sa.Column("document", sa.JSON(), nullable=False),
        sa.Column("envelope", sa.Text(), nullable=False),
        _ts("updated_at"),
    )
    op.create_table(
        "metric_batches",
        sa.Column(
            "agent_id",
            sa.String(36),
            sa.ForeignKey("agents.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("seq", sa.BigInteger(), primary_key=True),
        _ts("window_start"),
        _ts("window_end"),
        _ts("received_at"),
    )
    op.create_table(
        "metric_series",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("agent_id", sa.String(36), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        _ts("window_start"),
        _ts("window_end"),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("errors", sa.BigInteger(), nullable=False),
        sa.Column("latency_sketch", sa.JSON(), nullable=False),
    )
    op.create_index("ix_metric_series_agent_id", "metric_series", ["agent_id"])
    op.create_index("ix_metric_series_window_start", "metric_series", ["window_start"])


def downgrade() -> None:
    for table in (
        "metric_series",
        "metric_batches",
        "desired_states",
        "rollouts",
        "agents",
        "enrollment_tokens",
        "api_tokens",
        "blobs",
        "model_versions",
        "models",
    ):
        op.drop_table(table)
