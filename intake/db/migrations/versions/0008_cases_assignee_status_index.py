"""an index for counting each agent's open cases

Revision ID: 0008
Revises: 0007
"""

from alembic import op


revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # least_open assignment counts an agent's open cases for every new case: without it,
    # each count reads every open case.
    op.create_index("ix_cases_assignee_status", "cases", ["assignee", "status"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_cases_assignee_status", table_name="cases")
