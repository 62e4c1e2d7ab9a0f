"""component status (intake status) and IMAP folder positions

Revision ID: 0003
Revises: 0001
Create Date: 2026-11-22 14:20:00
"""

from alembic import op
import sqlalchemy as sa
import intake.db.schema


revision = '0003'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('component_status',
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('state', sa.String(length=40), nullable=False),
    sa.Column('updated_at', intake.db.schema.UTCDateTime(timezone=True), nullable=False),
    sa.Column('last_success_at', intake.db.schema.UTCDateTime(timezone=True), nullable=True),
    sa.Column('backlog', sa.Integer(), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('last_error_at', intake.db.schema.UTCDateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('name')
    )
    op.create_table('imap_state',
    sa.Column('account', sa.String(length=200), nullable=False),
    sa.Column('folder', sa.String(length=500), nullable=False),
    sa.Column('uidvalidity', sa.BigInteger(), nullable=False),
    sa.Column('last_uid', sa.BigInteger(), nullable=False),
    sa.Column('updated_at', intake.db.schema.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('account', 'folder')
    )


def downgrade() -> None:
    op.drop_table('imap_state')
    op.drop_table('component_status')
