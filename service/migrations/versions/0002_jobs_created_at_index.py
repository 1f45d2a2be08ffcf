"""Index the jobs' submission time: `job list` reads the newest first, and the scheduler
orders the queue by age.

Revision ID: 0002
Revises: 0001
Created: 2026-12-03
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_jobs_created_at", "jobs", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_jobs_created_at", table_name="jobs")
