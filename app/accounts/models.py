"""The accounts table: one per customer of unblock, each with its own Mosaic organization."""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal

from sqlalchemy import CheckConstraint, DateTime, Numeric, String, Text, func
from sqlalchemy.orm import Mapped, mapped_column

from app.database import Base


class Account(Base):
    __tablename__ = "accounts"
    __table_args__ = (
        CheckConstraint("monthly_topup_cap_usd >= 0", name="monthly_topup_cap_usd_not_negative"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(200))
    # Fernet token of the Mosaic API key; never returned, never logged.
    mosaic_api_key_encrypted: Mapped[str] = mapped_column(Text)
    # SHA-256 of the webhook secret Mosaic sends in X-Mosaic-Signature.
    webhook_secret_hash: Mapped[str] = mapped_column(String(64))
    # The spend guard: auto top-up settings whose worst-case month costs more are refused
    # (app/organizations/spend_guard.py). None: no cap.
    monthly_topup_cap_usd: Mapped[Decimal | None] = mapped_column(Numeric(12, 2))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )
