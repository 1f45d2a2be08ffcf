"""Index the jobs by (state, id, updated_at) in place of state alone: the controller's loop
reads the id and updated_at of every queued job each turn, to find those changed since its
last turn, and this index answers that without reading the rows and their specs.

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
    op.create_index("ix_jobs_state_id_updated_at", "jobs", ["state", "id", "updated_at"])
    # Its leading column serves every lookup by state the old index served.
    op.drop_index("ix_jobs_state", table_name="jobs")


def downgrade() -> None:
    op.create_index("ix_jobs_state", "jobs", ["state"])
    op.drop_index("ix_jobs_state_id_updated_at", table_name="jobs")
