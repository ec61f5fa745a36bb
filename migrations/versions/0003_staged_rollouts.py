"""Staged rollouts: per-rollout progress, cohort membership, timeline; shadow drift metrics.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("rollouts") as batch:
        batch.add_column(sa.Column("stage_index", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("soak_started_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(
            sa.Column("promoted", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch.add_column(sa.Column("gate_results", sa.JSON(), nullable=False, server_default="{}"))
    op.create_table(
        "rollout_targets",
        sa.Column(
            "rollout_id",
            sa.String(36),
            sa.ForeignKey("rollouts.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column(
            "agent_id",
            sa.String(36),
            sa.ForeignKey("agents.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("stage", sa.Integer(), nullable=False),
        sa.Column("moved_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_rollout_targets_agent_id", "rollout_targets", ["agent_id"])
    op.create_table(
        "rollout_events",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column(
            "rollout_id",
            sa.String(36),
            sa.ForeignKey("rollouts.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("stage", sa.Integer(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("figures", sa.JSON(), nullable=False),
    )
    op.create_index("ix_rollout_events_rollout_id", "rollout_events", ["rollout_id"])
    with op.batch_alter_table("metric_series") as batch:
        batch.add_column(
            sa.Column("shadow_count", sa.BigInteger(), nullable=False, server_default="0")
        )
        batch.add_column(sa.Column("drift_sum", sa.Float(), nullable=False, server_default="0"))
        batch.add_column(
            sa.Column("argmax_agree", sa.BigInteger(), nullable=False, server_default="0")
        )
    op.create_index(
        "ix_metric_series_model_version_window",
        "metric_series",
        ["model", "version", "window_start"],
    )


def downgrade() -> None:
    op.drop_index("ix_metric_series_model_version_window", "metric_series")
    with op.batch_alter_table("metric_series") as batch:
        for col in ("shadow_count", "drift_sum", "argmax_agree"):
            batch.drop_column(col)
    op.drop_table("rollout_events")
    op.drop_table("rollout_targets")
    with op.batch_alter_table("rollouts") as batch:
        for col in ("stage_index", "soak_started_at", "promoted", "gate_results"):
            batch.drop_column(col)
