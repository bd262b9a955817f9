"""The organization's billing decision: one row per account, with an append-only history."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, DateTime, ForeignKey, Index, Integer, String, Text, func
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from app.database import Base


class Decision(Base):
    """What the organization's person decided (plan, checkout, auto top-up) and what Mosaic did.

    A Mosaic organization has one plan and one auto top-up setting, so this is one row per
    account however many of its runs are blocked; the blocked runs wait on it.
    """

    __tablename__ = "organization_decisions"

    account_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True
    )
    state: Mapped[str] = mapped_column(String(32), server_default="idle")
    version: Mapped[int] = mapped_column(Integer, server_default="1")
    # Each time a newly blocked run makes the organization's situation a question again.
    round: Mapped[int] = mapped_column(Integer, server_default="0")
    # The event that brought the decision to its state: waiting runs are moved by it.
    last_event: Mapped[str | None] = mapped_column(String(40))
    plan: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    plans: Mapped[list[dict[str, Any]] | None] = mapped_column(JSONB)
    chosen_plan_id: Mapped[str | None] = mapped_column(String(100))
    checkout_url: Mapped[str | None] = mapped_column(Text)
    checkout_opened_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    topup: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    decided_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    state_changed_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )


class DecisionHistoryEntry(Base):
    """Append-only (a trigger refuses UPDATE and DELETE): every move of a decision, and why."""

    __tablename__ = "organization_decision_history"
    __table_args__ = (Index("ix_organization_decision_history_account", "account_id", "id"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    account_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("accounts.id"))
    round: Mapped[int] = mapped_column(Integer)
    from_state: Mapped[str] = mapped_column(String(32))
    to_state: Mapped[str] = mapped_column(String(32))
    event: Mapped[str] = mapped_column(String(40))
    actor: Mapped[str] = mapped_column(String(200))
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
