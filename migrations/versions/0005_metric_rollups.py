"""Metric roll-ups per minute and per hour, and the index retention deletes use.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "metric_rollups",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("resolution_s", sa.Integer(), nullable=False),
        sa.Column("bucket_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("agent_id", sa.String(36), nullable=False),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("errors", sa.BigInteger(), nullable=False),
        sa.Column("latency_sketch", sa.JSON(), nullable=False),
        sa.Column("shadow_count", sa.BigInteger(), nullable=False),
        sa.Column("drift_sum", sa.Float(), nullable=False),
        sa.Column("argmax_agree", sa.BigInteger(), nullable=False),
        sa.UniqueConstraint(
            "resolution_s",
            "agent_id",
            "model",
            "version",
            "bucket_start",
            name="uq_metric_rollups_bucket",
        ),
    )
    op.create_index("ix_metric_rollups_model_bucket", "metric_rollups", ["model", "bucket_start"])
    op.create_index(
        "ix_metric_rollups_resolution_bucket", "metric_rollups", ["resolution_s", "bucket_start"]
    )
    op.create_index("ix_metric_batches_window_end", "metric_batches", ["window_end"])


def downgrade() -> None:
    op.drop_index("ix_metric_batches_window_end", "metric_batches")
    op.drop_table("metric_rollups")
