"""An index for `pending` on blocked runs that wait on their organization's decision: the
account's pending decision steps and releases. Without it, each such run seq-scans jobs.
Built CONCURRENTLY: jobs can be large.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-25
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.execute(
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS ix_jobs_awaited ON jobs (account_id)"
            " WHERE status = 'pending' AND kind IN"
            " ('check_plan','upgrade_plan','confirm_checkout','set_topup','release_runs')"
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.execute("DROP INDEX CONCURRENTLY IF EXISTS ix_jobs_awaited")
