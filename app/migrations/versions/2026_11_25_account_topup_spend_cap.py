"""An optional monthly cap on what auto top-up may spend, per account.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("accounts", sa.Column("monthly_topup_cap_usd", sa.Numeric(12, 2), nullable=True))
    op.create_check_constraint(
        "monthly_topup_cap_usd_not_negative", "accounts", "monthly_topup_cap_usd >= 0"
    )


def downgrade() -> None:
    # Dropping the column drops its check constraint with it.
    op.drop_column("accounts", "monthly_topup_cap_usd")
