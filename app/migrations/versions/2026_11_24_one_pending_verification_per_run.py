"""At most one pending verification per Mosaic run: copies of one failure ask Mosaic once.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE UNIQUE INDEX uq_jobs_one_pending_verify ON jobs (account_id, (payload->>'run_id'))
        WHERE kind = 'verify_run' AND status = 'pending'
        """
    )


def downgrade() -> None:
    op.drop_index("uq_jobs_one_pending_verify", table_name="jobs")
