"""Sweeps: the sweeps table, and the sweep each job is a trial of; elastic gangs: the range
of workers a job may run with; job kinds: pretrain, or evaluate a registered encoder.

Revision ID: 0005
Revises: 0004
Created: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sweeps",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("owner", sa.String(128), nullable=False, index=True),
        sa.Column("state", sa.String(16), nullable=False, index=True),
        sa.Column("spec_yaml", sa.Text(), nullable=False),
        sa.Column("metric", sa.String(128), nullable=False),
        sa.Column("mode", sa.String(8), nullable=False),
        sa.Column("max_parallel", sa.Integer(), nullable=False),
        sa.Column("promote", sa.String(64), nullable=True),
        sa.Column("trials", sa.JSON(), nullable=False),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    )
    # NULL for every earlier job: none was a trial.
    op.add_column("jobs", sa.Column("sweep_id", sa.String(64), nullable=True))
    op.create_index("ix_jobs_sweep_id", "jobs", ["sweep_id"])
    # NULL for fixed gangs (every earlier job): workers is then their only size.
    op.add_column("jobs", sa.Column("min_workers", sa.Integer(), nullable=True))
    op.add_column("jobs", sa.Column("max_workers", sa.Integer(), nullable=True))
    # Every earlier job pretrained.
    op.add_column(
        "jobs",
        sa.Column("kind", sa.String(16), nullable=False, server_default="pretrain"),
    )


def downgrade() -> None:
    op.drop_column("jobs", "kind")
    op.drop_column("jobs", "max_workers")
    op.drop_column("jobs", "min_workers")
    op.drop_index("ix_jobs_sweep_id", "jobs")
    op.drop_column("jobs", "sweep_id")
    op.drop_table("sweeps")
