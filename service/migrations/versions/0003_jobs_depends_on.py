"""The jobs a job waits for (`depends_on` in its spec), as a column the loop reads without
loading every queued job's spec.

Revision ID: 0003
Revises: 0002
Created: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Space-separated job ids; NULL for a job that waits for none (every earlier job).
    op.add_column("jobs", sa.Column("depends_on", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "depends_on")
