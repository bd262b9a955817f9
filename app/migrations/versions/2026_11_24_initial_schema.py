"""Initial schema: accounts, blocked runs and their history, the webhook inbox, pending work.

Revision ID: 0001
Revises:
Create Date: 2026-11-24 20:07:40.637507
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

ALL_STATES = (
    "('checking_plan','awaiting_choice','awaiting_checkout','topup_prompt','resuming',"
    "'resumed','cancelled','failed','expired')"
)


def upgrade() -> None:
    op.create_table(
        "accounts",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("mosaic_api_key_encrypted", sa.Text(), nullable=False),
        sa.Column("webhook_secret_hash", sa.String(length=64), nullable=False),
        sa.Column("topup_answered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_accounts")),
    )
    op.create_table(
        "blocked_runs",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("account_id", sa.Uuid(), nullable=False),
        sa.Column("run_id", sa.String(length=200), nullable=False),
        sa.Column("agent_id", sa.String(length=200), nullable=True),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("version", sa.Integer(), server_default="1", nullable=False),
        sa.Column("plan", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("plans", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("chosen_plan_id", sa.String(length=100), nullable=True),
        sa.Column("checkout_url", sa.Text(), nullable=True),
        sa.Column("topup", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("error_code", sa.String(length=64), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "state_changed_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.id"],
            name=op.f("fk_blocked_runs_account_id_accounts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_blocked_runs")),
    )
    op.create_index(
        "ix_blocked_runs_account_page",
        "blocked_runs",
        ["account_id", "created_at", "id"],
        unique=False,
    )
    op.create_index(
        "ix_blocked_runs_account_run", "blocked_runs", ["account_id", "run_id"], unique=False
    )
    op.create_index(
        "uq_blocked_runs_one_open_episode",
        "blocked_runs",
        ["account_id", "run_id"],
        unique=True,
        postgresql_where=sa.text(
            "state IN ('checking_plan','awaiting_choice','awaiting_checkout','topup_prompt','resuming')"
        ),
    )
    op.create_table(
        "webhook_events",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("account_id", sa.Uuid(), nullable=False),
        sa.Column("dedup_key", sa.String(length=80), nullable=False),
        sa.Column("flag", sa.String(length=64), nullable=True),
        sa.Column("run_id", sa.String(length=200), nullable=True),
        sa.Column("payload", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("raw_body", sa.Text(), nullable=False),
        sa.Column("outcome", sa.String(length=32), nullable=False),
        sa.Column(
            "received_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.id"],
            name=op.f("fk_webhook_events_account_id_accounts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_events")),
        sa.UniqueConstraint("account_id", "dedup_key", name=op.f("uq_webhook_events_account_id")),
    )
    op.create_index(
        "ix_webhook_events_received_at", "webhook_events", ["received_at"], unique=False
    )
    op.create_table(
        "blocked_run_history",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("blocked_run_id", sa.Uuid(), nullable=False),
        sa.Column("from_state", sa.String(length=32), nullable=True),
        sa.Column("to_state", sa.String(length=32), nullable=False),
        sa.Column("event", sa.String(length=40), nullable=False),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["blocked_run_id"],
            ["blocked_runs.id"],
            name=op.f("fk_blocked_run_history_blocked_run_id_blocked_runs"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_blocked_run_history")),
    )
    op.create_index(
        "ix_blocked_run_history_run", "blocked_run_history", ["blocked_run_id", "id"], unique=False
    )
    op.create_table(
        "jobs",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("kind", sa.String(length=40), nullable=False),
        sa.Column("account_id", sa.Uuid(), nullable=False),
        sa.Column("blocked_run_id", sa.Uuid(), nullable=True),
        sa.Column(
            "payload",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column("status", sa.String(length=16), server_default="pending", nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column(
            "run_after", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.Column("locked_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("locked_by", sa.String(length=100), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("give_up_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.id"],
            name=op.f("fk_jobs_account_id_accounts"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["blocked_run_id"],
            ["blocked_runs.id"],
            name=op.f("fk_jobs_blocked_run_id_blocked_runs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
    )
    op.create_index(
        "ix_jobs_due",
        "jobs",
        ["run_after"],
        unique=False,
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.create_index(
        "uq_jobs_one_pending_per_run",
        "jobs",
        ["blocked_run_id"],
        unique=True,
        postgresql_where=sa.text("status = 'pending' AND blocked_run_id IS NOT NULL"),
    )
    op.create_check_constraint("state", "blocked_runs", f"state IN {ALL_STATES}")
    op.create_check_constraint(
        "status", "jobs", "status IN ('pending','done','failed','cancelled')"
    )
    # History is evidence: the database itself refuses to rewrite or delete it.
    op.execute(
        """
        CREATE FUNCTION unblock_history_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'blocked_run_history is append-only';
        END $$
        """
    )
    op.execute(
        """
        CREATE TRIGGER blocked_run_history_append_only
        BEFORE UPDATE OR DELETE ON blocked_run_history
        FOR EACH ROW EXECUTE FUNCTION unblock_history_append_only()
        """
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER blocked_run_history_append_only ON blocked_run_history")
    op.execute("DROP FUNCTION unblock_history_append_only()")
    op.drop_index(
        "uq_jobs_one_pending_per_run",
        table_name="jobs",
        postgresql_where=sa.text("status = 'pending' AND blocked_run_id IS NOT NULL"),
    )
    op.drop_index("ix_jobs_due", table_name="jobs", postgresql_where=sa.text("status = 'pending'"))
    op.drop_table("jobs")
    op.drop_index("ix_blocked_run_history_run", table_name="blocked_run_history")
    op.drop_table("blocked_run_history")
    op.drop_index("ix_webhook_events_received_at", table_name="webhook_events")
    op.drop_table("webhook_events")
    op.drop_index(
        "uq_blocked_runs_one_open_episode",
        table_name="blocked_runs",
        postgresql_where=sa.text(
            "state IN ('checking_plan','awaiting_choice','awaiting_checkout','topup_prompt','resuming')"
        ),
    )
    op.drop_index("ix_blocked_runs_account_run", table_name="blocked_runs")
    op.drop_index("ix_blocked_runs_account_page", table_name="blocked_runs")
    op.drop_table("blocked_runs")
    op.drop_table("accounts")
