"""Status that only moves forward: the order of the status report an agent row holds.

``status_epoch`` and ``status_seq`` are the agent's own (epoch, seq) of that report (0, 0 for
a report without them, from an agent older than the fields) and ``status_sent_at`` its
``sentAt``. A report is stored only when its order is newer than these (control_plane/
status_order.py). Rows stored before start at (0, 0) with no time: the first report after the
upgrade is stored, whatever it carries.

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("agents") as batch:
        batch.add_column(
            sa.Column("status_epoch", sa.BigInteger(), nullable=False, server_default="0")
        )
        batch.add_column(
            sa.Column("status_seq", sa.BigInteger(), nullable=False, server_default="0")
        )
        batch.add_column(sa.Column("status_sent_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("agents") as batch:
        batch.drop_column("status_sent_at")
        batch.drop_column("status_seq")
        batch.drop_column("status_epoch")
