"""who caused each timeline entry; details of a component's status

Revision ID: 0006
Revises: 0005
"""

from alembic import op
import sqlalchemy as sa


revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("actor", sa.String(length=320), nullable=True))
    with op.batch_alter_table("component_status", schema=None) as batch_op:
        batch_op.add_column(sa.Column("details", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("component_status", schema=None) as batch_op:
        batch_op.drop_column("details")
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.drop_column("actor")
