"""Indexes for the upkeep's queries: expiry by (state, state_changed_at), and pruning of
finished steps that belong to no run by finished_at. Built CONCURRENTLY: jobs can be large.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.execute(
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS ix_blocked_runs_state_changed"
            " ON blocked_runs (state, state_changed_at)"
        )
        op.execute(
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS ix_jobs_prunable ON jobs (finished_at)"
            " WHERE blocked_run_id IS NULL AND status <> 'pending'"
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.execute("DROP INDEX CONCURRENTLY IF EXISTS ix_jobs_prunable")
        op.execute("DROP INDEX CONCURRENTLY IF EXISTS ix_blocked_runs_state_changed")
