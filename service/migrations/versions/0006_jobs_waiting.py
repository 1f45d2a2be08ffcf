"""Why a queued job waits, and when it is estimated to start, as the controller's loop last
planned: the API's processes read them from the store (the loop runs in a process of its own).

Revision ID: 0006
Revises: 0005
Created: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # NULL until the loop's next turn plans the job.
    op.add_column("jobs", sa.Column("waiting", sa.Text(), nullable=True))
    op.add_column("jobs", sa.Column("estimated_start", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "estimated_start")
    op.drop_column("jobs", "waiting")
