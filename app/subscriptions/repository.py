"""Every query on subscriptions and deliveries; `account_id=None` only for admins and operators."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Select, func, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.errors import NotFound
from app.subscriptions.models import Delivery, Subscription


def _scoped(stmt: Select[Any], account_id: uuid.UUID | None) -> Select[Any]:
    return stmt if account_id is None else stmt.where(Subscription.account_id == account_id)


async def get(
    session: AsyncSession, account_id: uuid.UUID | None, subscription_id: uuid.UUID
) -> Subscription:
    """The subscription, or 404 (another account's is indistinguishable from an unknown one)."""
    stmt = _scoped(select(Subscription).where(Subscription.id == subscription_id), account_id)
    found = await session.scalar(stmt.execution_options(populate_existing=True))
    if found is None:
        raise NotFound("No such subscription.", code="subscription_not_found")
    return found


async def list_for(session: AsyncSession, account_id: uuid.UUID | None) -> Sequence[Subscription]:
    stmt = _scoped(select(Subscription), account_id).order_by(Subscription.created_at)
    return (await session.scalars(stmt)).all()


async def set_status(
    session: AsyncSession, subscription: Subscription, status: str, reason: str | None
) -> None:
    await session.execute(
        update(Subscription)
        .where(Subscription.id == subscription.id)
        .values(
            status=status,
            disabled_reason=reason,
            disabled_at=func.now() if status == "disabled" else None,
            updated_at=func.now(),
        )
    )


async def renew_pending(
    session: AsyncSession, subscription_id: uuid.UUID, horizon_seconds: float
) -> None:
    """Deliveries still waiting get a fresh horizon and are due now (after a re-enable)."""
    await session.execute(
        text(
            "UPDATE notification_deliveries SET next_attempt_at = now(), "
            "give_up_at = now() + make_interval(secs => :h) "
            "WHERE subscription_id = :s AND status = 'pending'"
        ),
        {"s": subscription_id, "h": horizon_seconds},
    )


async def delivery(
    session: AsyncSession, account_id: uuid.UUID | None, delivery_id: int
) -> Delivery:
    stmt = select(Delivery).where(Delivery.id == delivery_id)
    if account_id is not None:
        stmt = stmt.where(Delivery.account_id == account_id)
    found = await session.scalar(stmt)
    if found is None:
        raise NotFound("No such delivery.", code="delivery_not_found")
    return found


async def deliveries(
    session: AsyncSession,
    *,
    account_id: uuid.UUID | None,
    subscription_id: uuid.UUID | None,
    status: str | None,
    before: int | None,
    limit: int,
) -> Sequence[Delivery]:
    """Newest first."""
    stmt = select(Delivery)
    if account_id is not None:
        stmt = stmt.where(Delivery.account_id == account_id)
    if subscription_id is not None:
        stmt = stmt.where(Delivery.subscription_id == subscription_id)
    if status is not None:
        stmt = stmt.where(Delivery.status == status)
    if before is not None:
        stmt = stmt.where(Delivery.id < before)
    return (await session.scalars(stmt.order_by(Delivery.id.desc()).limit(limit))).all()


async def copy_for_redelivery(
    session: AsyncSession, original: Delivery, horizon_seconds: float
) -> int:
    """A new pending delivery of the same message (same `webhook-id`, payload and run order)."""
    new_id: int = (
        await session.execute(
            text(
                "INSERT INTO notification_deliveries (subscription_id, account_id, message_id, "
                "event_type, ordering_key, payload, give_up_at) "
                "SELECT subscription_id, account_id, message_id, event_type, ordering_key, "
                "payload, now() + make_interval(secs => :h) "
                "FROM notification_deliveries WHERE id = :id RETURNING id"
            ),
            {"id": original.id, "h": horizon_seconds},
        )
    ).scalar_one()
    return new_id
