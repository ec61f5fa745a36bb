"""Metric rows the roll-up set aside: rows it could not merge, kept with their reason.

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "metric_set_aside",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("set_aside_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("source", sa.String(32), nullable=False),
        sa.Column("source_id", sa.BigInteger(), nullable=False),
        sa.Column("agent_id", sa.String(36), nullable=False),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("row", sa.Text(), nullable=False),
    )
    op.create_index("ix_metric_set_aside_set_aside_at", "metric_set_aside", ["set_aside_at"])
    op.create_index("ix_metric_set_aside_agent_id", "metric_set_aside", ["agent_id"])


def downgrade() -> None:
    op.drop_index("ix_metric_set_aside_agent_id", "metric_set_aside")
    op.drop_index("ix_metric_set_aside_set_aside_at", "metric_set_aside")
    op.drop_table("metric_set_aside")
