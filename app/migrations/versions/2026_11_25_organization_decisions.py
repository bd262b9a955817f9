"""The organization's decision as a row of its own; runs wait on it.

Moves the existing data: one decision per account, in the most advanced state its open episodes
show (with their plans, checkout and top-up), `accounts.topup_answered_at` as the decision's
`decided_at`; the per-run plan, checkout and top-up steps still pending become the decision's
single step (a person acts again where one was under way), and a release job per account lines
the open episodes up with their decision.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

DECISION_STATES = (
    "('idle','checking_plan','awaiting_choice','awaiting_checkout','topup_prompt','decided')"
)
DECISION_KINDS = "('check_plan','upgrade_plan','confirm_checkout','set_topup')"


def upgrade() -> None:
    op.create_table(
        "organization_decisions",
        sa.Column("account_id", sa.Uuid(), nullable=False),
        sa.Column("state", sa.String(length=32), server_default="idle", nullable=False),
        sa.Column("version", sa.Integer(), server_default="1", nullable=False),
        sa.Column("round", sa.Integer(), server_default="0", nullable=False),
        sa.Column("last_event", sa.String(length=40), nullable=True),
        sa.Column("plan", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("plans", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("chosen_plan_id", sa.String(length=100), nullable=True),
        sa.Column("checkout_url", sa.Text(), nullable=True),
        sa.Column("checkout_opened_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("topup", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("error_code", sa.String(length=64), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
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
            name=op.f("fk_organization_decisions_account_id_accounts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("account_id", name=op.f("pk_organization_decisions")),
    )
    op.create_check_constraint("state", "organization_decisions", f"state IN {DECISION_STATES}")
    op.create_table(
        "organization_decision_history",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("account_id", sa.Uuid(), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("from_state", sa.String(length=32), nullable=False),
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
            ["account_id"],
            ["accounts.id"],
            name=op.f("fk_organization_decision_history_account_id_accounts"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_organization_decision_history")),
    )
    op.create_index(
        "ix_organization_decision_history_account",
        "organization_decision_history",
        ["account_id", "id"],
        unique=False,
    )
    op.execute(
        """
        CREATE TRIGGER organization_decision_history_append_only
        BEFORE UPDATE OR DELETE ON organization_decision_history
        FOR EACH ROW EXECUTE FUNCTION unblock_history_append_only()
        """
    )

    # --- the data: one decision per account, from its open episodes -----------------------
    op.execute(
        """
        INSERT INTO organization_decisions
            (account_id, state, last_event, plan, plans, chosen_plan_id, checkout_url,
             checkout_opened_at, topup, decided_at, round)
        SELECT a.id,
               COALESCE(lead.state, CASE WHEN a.topup_answered_at IS NULL THEN 'idle'
                                         ELSE 'decided' END),
               CASE lead.state WHEN 'awaiting_choice' THEN 'plan_free'
                               WHEN 'awaiting_checkout' THEN 'checkout_required'
                               WHEN 'topup_prompt' THEN 'plan_paid' END,
               lead.plan, lead.plans, lead.chosen_plan_id, lead.checkout_url,
               CASE WHEN lead.state = 'awaiting_checkout' THEN lead.state_changed_at END,
               lead.topup, a.topup_answered_at,
               CASE WHEN lead.state IS NULL AND a.topup_answered_at IS NULL THEN 0 ELSE 1 END
        FROM accounts AS a
        LEFT JOIN LATERAL (
            SELECT * FROM blocked_runs AS b
            WHERE b.account_id = a.id
              AND b.state IN ('checking_plan','awaiting_choice','awaiting_checkout','topup_prompt')
            ORDER BY array_position(
                ARRAY['topup_prompt','awaiting_checkout','awaiting_choice','checking_plan'],
                b.state::text), b.state_changed_at DESC
            LIMIT 1
        ) AS lead ON true
        """
    )
    op.execute(
        """
        INSERT INTO organization_decision_history
            (account_id, round, from_state, to_state, event, actor, reason)
        SELECT account_id, round, 'idle', state, COALESCE(last_event, 'blocked'), 'migration',
               'taken over from the blocked runs'
        FROM organization_decisions WHERE state <> 'idle'
        """
    )
    # Per-run plan, checkout and top-up steps become the decision's: the pending ones are
    # dropped (a check is recorded for decisions still checking; a person acts again).
    op.execute(
        f"""
        UPDATE jobs SET status = 'cancelled', finished_at = now(), locked_until = NULL,
                        last_error = 'superseded by the organization decision (migration 0004)'
        WHERE status = 'pending' AND kind IN {DECISION_KINDS}
        """
    )
    op.execute(
        """
        INSERT INTO jobs (kind, account_id, give_up_at)
        SELECT 'check_plan', account_id, now() + interval '1 hour'
        FROM organization_decisions WHERE state = 'checking_plan'
        """
    )
    op.create_index(
        "uq_jobs_one_decision_step",
        "jobs",
        ["account_id"],
        unique=True,
        postgresql_where=sa.text(f"status = 'pending' AND kind IN {DECISION_KINDS}"),
    )
    op.create_index(
        "uq_jobs_one_release",
        "jobs",
        ["account_id"],
        unique=True,
        postgresql_where=sa.text("status = 'pending' AND kind = 'release_runs'"),
    )
    op.create_index(
        "uq_jobs_one_checkout_poll",
        "jobs",
        ["account_id"],
        unique=True,
        postgresql_where=sa.text("status = 'pending' AND kind = 'poll_checkout'"),
    )
    # Runs behind their decision's state are lined up with it by a release.
    op.execute(
        """
        INSERT INTO jobs (kind, account_id, give_up_at)
        SELECT 'release_runs', account_id, now() + interval '1 hour'
        FROM organization_decisions WHERE last_event IS NOT NULL
        """
    )
    op.drop_column("accounts", "topup_answered_at")


def downgrade() -> None:
    op.add_column(
        "accounts",
        sa.Column("topup_answered_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.execute(
        """
        UPDATE accounts AS a SET topup_answered_at = d.decided_at
        FROM organization_decisions AS d WHERE d.account_id = a.id
        """
    )
    op.execute(
        """
        UPDATE jobs SET status = 'cancelled', finished_at = now(), locked_until = NULL
        WHERE status = 'pending' AND (blocked_run_id IS NULL AND kind <> 'verify_run')
        """
    )
    op.drop_index("uq_jobs_one_checkout_poll", table_name="jobs")
    op.drop_index("uq_jobs_one_release", table_name="jobs")
    op.drop_index("uq_jobs_one_decision_step", table_name="jobs")
    op.execute(
        "DROP TRIGGER organization_decision_history_append_only ON organization_decision_history"
    )
    op.drop_index(
        "ix_organization_decision_history_account", table_name="organization_decision_history"
    )
    op.drop_table("organization_decision_history")
    op.drop_table("organization_decisions")
