"""Subscriptions to outbound notifications: create (the secret shown once), read, enable and
disable, the delivery log, and redelivery. The API and the operator commands both come here."""

from __future__ import annotations

import base64
import secrets
import uuid
from collections.abc import Sequence

from app.errors import Conflict, NotFound
from app.notifications import JOBS_CHANNEL, notify
from app.runtime import Runtime
from app.settings import Environment
from app.subscriptions import destination, repository
from app.subscriptions.models import Delivery, Subscription
from app.subscriptions.schemas import SubscriptionCreate


def generate_secret() -> str:
    """A Standard Webhooks secret: `whsec_` and 32 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


async def check_destination(rt: Runtime, url: str) -> None:
    """Refuse a URL notifications may not go to (422 `destination_not_allowed`)."""
    parsed = destination.check_url(url, https_only=rt.settings.env is Environment.PRODUCTION)
    await destination.resolve(
        parsed, destination.allowed_networks(rt.settings.notify_allowed_networks)
    )


async def create(
    rt: Runtime, account_id: uuid.UUID, body: SubscriptionCreate
) -> tuple[Subscription, str]:
    """Store a subscription; its signing secret is returned here and never again."""
    await check_destination(rt, body.url)
    secret = generate_secret()
    async with rt.db.transaction() as session:
        subscription = Subscription(
            account_id=account_id,
            url=body.url,
            event_types=[e.value for e in body.event_types],
            description=body.description,
            secret_encrypted=rt.keyring.encrypt(secret),
        )
        session.add(subscription)
        await session.flush()
        await session.refresh(subscription)
    return subscription, secret


async def read(
    rt: Runtime, account_id: uuid.UUID | None, subscription_id: uuid.UUID
) -> Subscription:
    """One subscription (an admin's or operator's `account_id` is None: any account)."""
    async with rt.db.sessions() as session:
        return await repository.get(session, account_id, subscription_id)


async def list_subscriptions(rt: Runtime, account_id: uuid.UUID | None) -> Sequence[Subscription]:
    """The account's subscriptions (every account's for None)."""
    async with rt.db.sessions() as session:
        return await repository.list_for(session, account_id)


async def enable(
    rt: Runtime, account_id: uuid.UUID | None, subscription_id: uuid.UUID
) -> Subscription:
    """Enable a (disabled) subscription: what still waits is retried now, with a fresh horizon."""
    async with rt.db.transaction() as session:
        subscription = await repository.get(session, account_id, subscription_id)
        await check_destination(rt, subscription.url)
        await repository.set_status(session, subscription, "active", None)
        await repository.renew_pending(
            session, subscription.id, rt.settings.notify_give_up_after.total_seconds()
        )
        await notify(session, JOBS_CHANNEL)
        return await repository.get(session, account_id, subscription_id)


async def disable(
    rt: Runtime, account_id: uuid.UUID | None, subscription_id: uuid.UUID, actor: str
) -> Subscription:
    """Stop recording and delivering events for this subscription until it is enabled again."""
    async with rt.db.transaction() as session:
        subscription = await repository.get(session, account_id, subscription_id)
        await repository.set_status(session, subscription, "disabled", f"disabled by {actor}")
        return await repository.get(session, account_id, subscription_id)


async def delete(rt: Runtime, account_id: uuid.UUID | None, subscription_id: uuid.UUID) -> None:
    """Remove the subscription and its delivery log."""
    async with rt.db.transaction() as session:
        subscription = await repository.get(session, account_id, subscription_id)
        await session.delete(subscription)


async def deliveries(
    rt: Runtime,
    account_id: uuid.UUID | None,
    *,
    subscription_id: uuid.UUID | None,
    status: str | None = None,
    before: int | None = None,
    limit: int = 50,
) -> Sequence[Delivery]:
    """The delivery log, newest first, each with its last answer."""
    async with rt.db.sessions() as session:
        if subscription_id is not None:
            await repository.get(session, account_id, subscription_id)  # 404 first
        return await repository.deliveries(
            session,
            account_id=account_id,
            subscription_id=subscription_id,
            status=status,
            before=before,
            limit=limit,
        )


async def redeliver(
    rt: Runtime,
    account_id: uuid.UUID | None,
    delivery_id: int,
    *,
    subscription_id: uuid.UUID | None = None,
) -> Delivery:
    """Send a delivered or failed message again (same `webhook-id`), as a new log entry."""
    async with rt.db.transaction() as session:
        original = await repository.delivery(session, account_id, delivery_id)
        if subscription_id is not None and original.subscription_id != subscription_id:
            raise NotFound("No such delivery.", code="delivery_not_found")
        if original.status == "pending":
            raise Conflict("This delivery is still being attempted.", code="delivery_pending")
        subscription = await repository.get(session, account_id, original.subscription_id)
        if subscription.status != "active":
            raise Conflict(
                "The subscription is disabled; enable it first.", code="subscription_disabled"
            )
        new_id = await repository.copy_for_redelivery(
            session, original, rt.settings.notify_give_up_after.total_seconds()
        )
        await notify(session, JOBS_CHANNEL)
        return await repository.delivery(session, account_id, new_id)
