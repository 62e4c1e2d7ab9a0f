"""outbox claims expire: who holds a claim, and how often one expired

Revision ID: 0009
Revises: 0008
"""

from alembic import op
import sqlalchemy as sa


revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMNs (no table rebuild on SQLite). Rows left `sending` by an older
    # intake have no holder: their claims expire and they go out once more by themselves.
    op.add_column("outbox", sa.Column("claimed_by", sa.String(length=200), nullable=True))
    op.add_column("outbox", sa.Column("requeued", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.drop_column("requeued")
        batch_op.drop_column("claimed_by")
