"""case links and merges; files sent with outgoing mail

Revision ID: 0007
Revises: 0006
"""

from alembic import op
import sqlalchemy as sa
import intake.db.schema


revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A plain ADD COLUMN: a foreign key would make SQLite rebuild the table every other one
    # refers to (slow on a large installation); the case operations keep it right.
    op.add_column("cases", sa.Column("merged_into_id", sa.Integer(), nullable=True))
    op.create_table(
        "case_links",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("case_id", sa.Integer(), nullable=False),
        sa.Column("other_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("actor", sa.String(length=320), nullable=True),
        sa.Column("created_at", intake.db.schema.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["case_id"], ["cases.id"]),
        sa.ForeignKeyConstraint(["other_id"], ["cases.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("case_id", "other_id", "kind", name="uq_case_links"),
    )
    with op.batch_alter_table("case_links", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_case_links_case_id"), ["case_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_case_links_other_id"), ["other_id"], unique=False)
    op.create_table(
        "outbox_attachments",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("outbox_id", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("filename", sa.Text(), nullable=False),
        sa.Column("content_type", sa.String(length=255), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["outbox_id"], ["outbox.id"]),
        sa.ForeignKeyConstraint(["sha256"], ["blobs.sha256"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("outbox_attachments", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_outbox_attachments_outbox_id"), ["outbox_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("outbox_attachments", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_outbox_attachments_outbox_id"))
    op.drop_table("outbox_attachments")
    with op.batch_alter_table("case_links", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_case_links_other_id"))
        batch_op.drop_index(batch_op.f("ix_case_links_case_id"))
    op.drop_table("case_links")
    with op.batch_alter_table("cases", schema=None) as batch_op:
        batch_op.drop_column("merged_into_id")
