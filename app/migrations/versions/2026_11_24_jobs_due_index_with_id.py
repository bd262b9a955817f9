"""Claim order is (run_after, id): index both, so a claim never sorts the pending set.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_jobs_due", table_name="jobs", postgresql_where=sa.text("status = 'pending'"))
    op.create_index(
        "ix_jobs_due",
        "jobs",
        ["run_after", "id"],
        unique=False,
        postgresql_where=sa.text("status = 'pending'"),
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_due", table_name="jobs", postgresql_where=sa.text("status = 'pending'"))
    op.create_index(
        "ix_jobs_due",
        "jobs",
        ["run_after"],
        unique=False,
        postgresql_where=sa.text("status = 'pending'"),
    )
