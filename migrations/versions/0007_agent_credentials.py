"""Agent credential rotation (a pending next credential) and revocation.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("agents") as batch:
        batch.add_column(sa.Column("next_credential_hash", sa.String(64), nullable=True))
        batch.add_column(sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True))
        batch.create_unique_constraint("uq_agents_next_credential_hash", ["next_credential_hash"])


def downgrade() -> None:
    with op.batch_alter_table("agents") as batch:
        batch.drop_constraint("uq_agents_next_credential_hash", type_="unique")
        batch.drop_column("revoked_at")
        batch.drop_column("next_credential_hash")
