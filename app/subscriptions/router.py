"""HTTP for outbound notification subscriptions and their delivery log.

accounts:admin may manage any account's subscriptions; subscriptions:admin its own account's.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Response, status

from app.auth import Principal, Scope, requires_any
from app.errors import Forbidden, InvalidInput
from app.runtime import Runtime, runtime
from app.subscriptions import service
from app.subscriptions.schemas import (
    DeliveryOut,
    DeliveryPage,
    SubscriptionCreate,
    SubscriptionCreated,
    SubscriptionList,
    SubscriptionOut,
)

# 401 and 403 come from the security of `_admin` (app/openapi.py); the ids are the caller's.
AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    404: {"description": "Unknown id, or another account's."},
}
router = APIRouter(prefix="/v1/subscriptions", tags=["subscriptions"], responses=AUTH_RESPONSES)
RT = Annotated[Runtime, Depends(runtime)]


async def _admin(
    principal: Annotated[
        Principal, Depends(requires_any(Scope.ACCOUNTS_ADMIN, Scope.SUBSCRIPTIONS_ADMIN))
    ],
) -> Principal:
    if principal.has(Scope.ACCOUNTS_ADMIN):
        return principal
    if principal.has(Scope.SUBSCRIPTIONS_ADMIN) and principal.account_id is not None:
        return principal
    raise Forbidden(
        "This needs accounts:admin, or subscriptions:admin for the token's account.",
        code="missing_scope",
    )


Admin = Annotated[Principal, Depends(_admin)]


def _scope(principal: Principal) -> uuid.UUID | None:
    """The account the caller may see (None: any, for accounts:admin)."""
    return None if principal.has(Scope.ACCOUNTS_ADMIN) else principal.account_id


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=SubscriptionCreated,
    responses={422: {"description": "Bad input, or a URL notifications may not go to."}},
)
async def create_subscription(
    body: SubscriptionCreate, principal: Admin, rt: RT
) -> SubscriptionCreated:
    """Subscribe a URL to run events; the signing secret is in this answer only."""
    account_id = body.account_id or principal.account_id
    if account_id is None:
        raise InvalidInput("Name the account_id to subscribe.", code="account_required")
    if not principal.has(Scope.ACCOUNTS_ADMIN) and account_id != principal.account_id:
        raise Forbidden("subscriptions:admin covers the token's own account only.")
    subscription, secret = await service.create(rt, account_id, body)
    return SubscriptionCreated(**SubscriptionOut.of(subscription).model_dump(), secret=secret)


@router.get("", response_model=SubscriptionList)
async def list_subscriptions(
    principal: Admin, rt: RT, account_id: uuid.UUID | None = None
) -> SubscriptionList:
    """The caller's account's subscriptions (an accounts:admin token: any, or `account_id`'s)."""
    scope = _scope(principal)
    if scope is None:
        scope = account_id
    items = await service.list_subscriptions(rt, scope)
    return SubscriptionList(items=[SubscriptionOut.of(s) for s in items])


@router.get("/{subscription_id}", response_model=SubscriptionOut)
async def read_subscription(
    subscription_id: uuid.UUID, principal: Admin, rt: RT
) -> SubscriptionOut:
    """One subscription: `status` says whether it is disabled, and `disabled_reason` why."""
    return SubscriptionOut.of(await service.read(rt, _scope(principal), subscription_id))


@router.post("/{subscription_id}/enable", response_model=SubscriptionOut)
async def enable(subscription_id: uuid.UUID, principal: Admin, rt: RT) -> SubscriptionOut:
    """Enable it again; deliveries still waiting are retried now."""
    return SubscriptionOut.of(await service.enable(rt, _scope(principal), subscription_id))


@router.post("/{subscription_id}/disable", response_model=SubscriptionOut)
async def disable(subscription_id: uuid.UUID, principal: Admin, rt: RT) -> SubscriptionOut:
    """Stop recording and sending events to it."""
    subscription = await service.disable(rt, _scope(principal), subscription_id, principal.actor)
    return SubscriptionOut.of(subscription)


@router.delete(
    "/{subscription_id}", status_code=status.HTTP_204_NO_CONTENT, response_class=Response
)
async def delete_subscription(subscription_id: uuid.UUID, principal: Admin, rt: RT) -> Response:
    """Remove it and its delivery log."""
    await service.delete(rt, _scope(principal), subscription_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/{subscription_id}/deliveries", response_model=DeliveryPage)
async def list_deliveries(
    subscription_id: uuid.UUID,
    principal: Admin,
    rt: RT,
    status_filter: Annotated[
        Literal["pending", "delivered", "failed"] | None, Query(alias="status")
    ] = None,
    before: Annotated[int | None, Query(ge=1)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> DeliveryPage:
    """The delivery log, newest first, with each delivery's last answer."""
    rows = await service.deliveries(
        rt,
        _scope(principal),
        subscription_id=subscription_id,
        status=status_filter,
        before=before,
        limit=limit,
    )
    next_cursor = str(rows[-1].id) if len(rows) == limit else None
    return DeliveryPage(items=[DeliveryOut.of(d) for d in rows], next_cursor=next_cursor)


@router.post(
    "/{subscription_id}/deliveries/{delivery_id}/redeliver",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=DeliveryOut,
    responses={409: {"description": "Still pending, or the subscription is disabled."}},
)
async def redeliver(
    subscription_id: uuid.UUID, delivery_id: int, principal: Admin, rt: RT
) -> DeliveryOut:
    """Send the message again (same `webhook-id`); the answer is the new log entry."""
    scope = _scope(principal)
    await service.read(rt, scope, subscription_id)
    delivered = await service.redeliver(rt, scope, delivery_id, subscription_id=subscription_id)
    return DeliveryOut.of(delivered)
