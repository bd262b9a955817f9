"""Blocked runs, their append-only history, and the pending work that moves them on."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    and_,
    exists,
    func,
    or_,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, column_property, mapped_column

from app.database import Base

ACTIVE_STATES_SQL = (
    "('checking_plan','awaiting_choice','awaiting_checkout','topup_prompt','resuming')"
)
# Run states that wait on the organization's decision (the decision's pending step is theirs).
DECIDING_STATES_SQL = "('checking_plan','awaiting_choice','awaiting_checkout','topup_prompt')"
# The Mosaic steps of an organization's decision: at most one pending per account at a time.
DECISION_STEP_KINDS_SQL = "('check_plan','upgrade_plan','confirm_checkout','set_topup')"
# What a run waiting on its decision waits for: a step of the decision, or its release.
AWAITED_KINDS_SQL = "('check_plan','upgrade_plan','confirm_checkout','set_topup','release_runs')"


class Job(Base):
    """A Mosaic call that a transition needs, recorded in the transition's own transaction."""

    __tablename__ = "jobs"
    __table_args__ = (
        # At most one step under way per blocked run: two workers never race on one run.
        Index(
            "uq_jobs_one_pending_per_run",
            "blocked_run_id",
            unique=True,
            postgresql_where=text("status = 'pending' AND blocked_run_id IS NOT NULL"),
        ),
        # Copies of one failure (deliveries differing in some field) ask Mosaic once.
        Index(
            "uq_jobs_one_pending_verify",
            "account_id",
            text("(payload->>'run_id')"),
            unique=True,
            postgresql_where=text("kind = 'verify_run' AND status = 'pending'"),
        ),
        # One pending step per organization decision: never two purchases under way at once.
        Index(
            "uq_jobs_one_decision_step",
            "account_id",
            unique=True,
            postgresql_where=text(f"status = 'pending' AND kind IN {DECISION_STEP_KINDS_SQL}"),
        ),
        # One pending release of waiting runs, and one checkout poll, per organization.
        Index(
            "uq_jobs_one_release",
            "account_id",
            unique=True,
            postgresql_where=text("status = 'pending' AND kind = 'release_runs'"),
        ),
        Index(
            "uq_jobs_one_checkout_poll",
            "account_id",
            unique=True,
            postgresql_where=text("status = 'pending' AND kind = 'poll_checkout'"),
        ),
        # One drain of a subscription's outbound notifications at a time (app/subscriptions).
        Index(
            "uq_jobs_one_notification_drain",
            text("(payload->>'subscription_id')"),
            unique=True,
            postgresql_where=text("kind = 'deliver_notifications' AND status = 'pending'"),
        ),
        # What a run waiting on its organization's decision waits for (`BlockedRun.pending`).
        Index(
            "ix_jobs_awaited",
            "account_id",
            postgresql_where=text(f"status = 'pending' AND kind IN {AWAITED_KINDS_SQL}"),
        ),
        # Claims take due jobs in (run_after, id) order.
        Index("ix_jobs_due", "run_after", "id", postgresql_where=text("status = 'pending'")),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(40))
    account_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    blocked_run_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("blocked_runs.id", ondelete="CASCADE")
    )
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    status: Mapped[str] = mapped_column(String(16), server_default="pending")
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    run_after: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    locked_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    locked_by: Mapped[str | None] = mapped_column(String(100))
    last_error: Mapped[str | None] = mapped_column(Text)
    give_up_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class BlockedRun(Base):
    """One episode of one Mosaic run being blocked for credits, from detection to an end."""

    __tablename__ = "blocked_runs"
    __table_args__ = (
        # One open episode per run, however many duplicate webhooks arrive at once.
        Index(
            "uq_blocked_runs_one_open_episode",
            "account_id",
            "run_id",
            unique=True,
            postgresql_where=text(f"state IN {ACTIVE_STATES_SQL}"),
        ),
        Index("ix_blocked_runs_account_page", "account_id", "created_at", "id"),
        Index("ix_blocked_runs_account_run", "account_id", "run_id"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    account_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    run_id: Mapped[str] = mapped_column(String(200))
    agent_id: Mapped[str | None] = mapped_column(String(200))
    state: Mapped[str] = mapped_column(String(32))
    version: Mapped[int] = mapped_column(Integer, server_default="1")
    plan: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    plans: Mapped[list[dict[str, Any]] | None] = mapped_column(JSONB)
    chosen_plan_id: Mapped[str | None] = mapped_column(String(100))
    checkout_url: Mapped[str | None] = mapped_column(Text)
    topup: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    state_changed_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )

    # Derived, never stored: a system step is under way while a job for this run is pending,
    # or, while the run waits on its organization's decision, while the decision has a step
    # under way or is still releasing its runs. OFFSET 0 keeps PostgreSQL from turning each
    # EXISTS into a hashed subplan over every pending job of every account (13k rows while a
    # large release is under way, for a 50-row page); it probes the partial indexes per row.
    pending: Mapped[bool] = column_property(
        or_(
            exists(
                select(Job.id)
                .where(and_(Job.blocked_run_id == id, Job.status == "pending"))
                .offset(0)
            ).correlate_except(Job),
            and_(
                text(f"blocked_runs.state IN {DECIDING_STATES_SQL}"),
                exists(
                    select(Job.id)
                    .where(
                        Job.account_id == account_id,
                        Job.status == "pending",
                        text(f"jobs.kind IN {AWAITED_KINDS_SQL}"),
                    )
                    .offset(0)
                ).correlate_except(Job),
            ),
        )
    )


class HistoryEntry(Base):
    """Append-only: a database trigger refuses UPDATE and DELETE on this table."""

    __tablename__ = "blocked_run_history"
    __table_args__ = (Index("ix_blocked_run_history_run", "blocked_run_id", "id"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    blocked_run_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("blocked_runs.id"))
    from_state: Mapped[str | None] = mapped_column(String(32))
    to_state: Mapped[str] = mapped_column(String(32))
    event: Mapped[str] = mapped_column(String(40))
    actor: Mapped[str] = mapped_column(String(200))
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
