"""The CPUs a job's Train workers take at once (workers x cpus_per_worker), which admission
counts against the nodes that train when the settings name a worker_resource.

Revision ID: 0004
Revises: 0003
Created: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # NULL for older jobs: admission then counts all their CPUs, an upper bound.
    op.add_column("jobs", sa.Column("worker_cpus", sa.Float(), nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "worker_cpus")
