"""Operator commands to agents (remote diagnostics) and their answers.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "agent_commands",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column(
            "agent_id",
            sa.String(36),
            sa.ForeignKey("agents.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("envelope", sa.Text(), nullable=False),
        sa.Column("since_s", sa.Integer(), nullable=False),
        sa.Column("max_bytes", sa.Integer(), nullable=False),
        sa.Column("issued_by", sa.String(200), nullable=False),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("delivered_via", sa.String(8), nullable=True),
        sa.Column("answered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("answered_via", sa.String(8), nullable=True),
        sa.Column("answer", sa.LargeBinary(), nullable=True),
        sa.Column("answer_digest", sa.String(71), nullable=True),
        sa.Column("error", sa.String(500), nullable=True),
    )
    op.create_index("ix_agent_commands_agent_state", "agent_commands", ["agent_id", "state"])
    op.create_index("ix_agent_commands_expires_at", "agent_commands", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_agent_commands_expires_at", "agent_commands")
    op.drop_index("ix_agent_commands_agent_state", "agent_commands")
    op.drop_table("agent_commands")
