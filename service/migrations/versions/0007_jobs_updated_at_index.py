"""Index the jobs' updated_at: each turn the controller's loop reads the jobs changed since
its last turn, instead of every queued job.

Revision ID: 0007
Revises: 0006
Created: 2026-12-07
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_jobs_updated_at", "jobs", ["updated_at"])


def downgrade() -> None:
    op.drop_index("ix_jobs_updated_at", table_name="jobs")
