"""Agent credentials stored as scrypt hashes, found by a lookup key.

Rows stored before keep their sha256 (it verifies, and is re-stored as scrypt at the
credential's first use); their lookup key is the first 16 hex digits of that sha256, which
is exactly what control_plane/security/auth.py computes from a presented credential.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("agents") as batch:
        batch.add_column(sa.Column("credential_lookup", sa.String(16), nullable=True))
        batch.add_column(sa.Column("next_credential_lookup", sa.String(16), nullable=True))
        batch.alter_column(
            "credential_hash",
            type_=sa.String(128),
            existing_type=sa.String(64),
            existing_nullable=False,
        )
        batch.alter_column(
            "next_credential_hash",
            type_=sa.String(128),
            existing_type=sa.String(64),
            existing_nullable=True,
        )
    op.execute(
        "UPDATE agents SET credential_lookup = substr(credential_hash, 1, 16) "
        "WHERE revoked_at IS NULL"
    )
    op.execute(
        "UPDATE agents SET next_credential_lookup = substr(next_credential_hash, 1, 16) "
        "WHERE next_credential_hash IS NOT NULL AND revoked_at IS NULL"
    )
    op.create_index("ix_agents_credential_lookup", "agents", ["credential_lookup"], unique=True)
    op.create_index(
        "ix_agents_next_credential_lookup", "agents", ["next_credential_lookup"], unique=True
    )


def downgrade() -> None:
    op.drop_index("ix_agents_next_credential_lookup", "agents")
    op.drop_index("ix_agents_credential_lookup", "agents")
    with op.batch_alter_table("agents") as batch:
        batch.drop_column("next_credential_lookup")
        batch.drop_column("credential_lookup")
