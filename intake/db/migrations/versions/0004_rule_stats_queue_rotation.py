"""rule stats and queue rotation (routing rules)

Revision ID: 0004
Revises: 0003
"""

from alembic import op
import sqlalchemy as sa
import intake.db.schema


revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rule_stats",
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("hits", sa.BigInteger(), nullable=False),
        sa.Column("first_hit_at", intake.db.schema.UTCDateTime(timezone=True), nullable=True),
        sa.Column("last_hit_at", intake.db.schema.UTCDateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_table(
        "queue_rotation",
        sa.Column("queue", sa.String(length=100), nullable=False),
        sa.Column("last_agent", sa.String(length=320), nullable=True),
        sa.Column("updated_at", intake.db.schema.UTCDateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("queue"),
    )


def downgrade() -> None:
    op.drop_table("queue_rotation")
    op.drop_table("rule_stats")
