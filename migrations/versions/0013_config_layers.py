"""Configuration layers per model (fleet, selector, agent, rollout), and locked labels.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "config_layers",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("scope", sa.String(16), nullable=False),
        sa.Column("target", sa.String(1100), nullable=False),
        sa.Column("selector", sa.JSON(), nullable=True),
        sa.Column(
            "agent_id",
            sa.String(36),
            sa.ForeignKey("agents.id", ondelete="CASCADE"),
            nullable=True,
        ),
        sa.Column(
            "rollout_id",
            sa.String(36),
            sa.ForeignKey("rollouts.id", ondelete="CASCADE"),
            nullable=True,
        ),
        sa.Column("values", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("model", "target", name="uq_config_layers_target"),
    )
    op.create_index("ix_config_layers_model", "config_layers", ["model"])
    op.create_index("ix_config_layers_agent_id", "config_layers", ["agent_id"])
    op.create_index("ix_config_layers_rollout_id", "config_layers", ["rollout_id"])
    with op.batch_alter_table("agents") as batch:
        batch.add_column(sa.Column("locked_labels", sa.JSON(), nullable=False, server_default="[]"))
    with op.batch_alter_table("enrollment_tokens") as batch:
        batch.add_column(
            sa.Column("lock_labels", sa.Boolean(), nullable=False, server_default=sa.false())
        )


def downgrade() -> None:
    with op.batch_alter_table("enrollment_tokens") as batch:
        batch.drop_column("lock_labels")
    with op.batch_alter_table("agents") as batch:
        batch.drop_column("locked_labels")
    op.drop_index("ix_config_layers_rollout_id", "config_layers")
    op.drop_index("ix_config_layers_agent_id", "config_layers")
    op.drop_index("ix_config_layers_model", "config_layers")
    op.drop_table("config_layers")
