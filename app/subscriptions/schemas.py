"""Subscriptions and their delivery log over HTTP (the secret appears once, at creation)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.input_text import StorableStr
from app.subscriptions.models import Delivery, Subscription
from app.subscriptions.outbox import EventType


class SubscriptionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: StorableStr = Field(
        min_length=1, max_length=2000, description="https (http only outside production)."
    )
    event_types: list[EventType] = Field(min_length=1, max_length=len(EventType))
    description: StorableStr | None = Field(default=None, max_length=200)
    account_id: uuid.UUID | None = Field(
        default=None, description="Only with accounts:admin; otherwise the token's account."
    )

    @field_validator("event_types")
    @classmethod
    def _unique(cls, value: list[EventType]) -> list[EventType]:
        return sorted(set(value))


class SubscriptionOut(BaseModel):
    id: uuid.UUID
    account_id: uuid.UUID
    url: str
    event_types: list[str]
    description: str | None
    status: str = Field(description="`active`, or `disabled` (see `disabled_reason`).")
    disabled_reason: str | None
    disabled_at: datetime | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, subscription: Subscription) -> SubscriptionOut:
        return cls(
            id=subscription.id,
            account_id=subscription.account_id,
            url=subscription.url,
            event_types=list(subscription.event_types),
            description=subscription.description,
            status=subscription.status,
            disabled_reason=subscription.disabled_reason,
            disabled_at=subscription.disabled_at,
            created_at=subscription.created_at,
            updated_at=subscription.updated_at,
        )


class SubscriptionCreated(SubscriptionOut):
    secret: str = Field(
        description="Standard Webhooks signing secret (whsec_…); shown only in this answer."
    )


class SubscriptionList(BaseModel):
    items: list[SubscriptionOut]


class DeliveryOut(BaseModel):
    id: int
    subscription_id: uuid.UUID
    message_id: str = Field(description="The `webhook-id` header; the same on every attempt.")
    event_type: str
    status: str = Field(description="`pending`, `delivered` or `failed`.")
    attempts: int
    next_attempt_at: datetime | None
    last_attempt_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    last_response: str | None = Field(description="The start of the subscriber's last answer.")
    delivered_at: datetime | None
    created_at: datetime
    payload: dict[str, Any]

    @classmethod
    def of(cls, delivery: Delivery) -> DeliveryOut:
        return cls(
            id=delivery.id,
            subscription_id=delivery.subscription_id,
            message_id=delivery.message_id,
            event_type=delivery.event_type,
            status=delivery.status,
            attempts=delivery.attempts,
            next_attempt_at=delivery.next_attempt_at if delivery.status == "pending" else None,
            last_attempt_at=delivery.last_attempt_at,
            last_status_code=delivery.last_status_code,
            last_error=delivery.last_error,
            last_response=delivery.last_response,
            delivered_at=delivery.delivered_at,
            created_at=delivery.created_at,
            payload=delivery.payload,
        )


class DeliveryPage(BaseModel):
    items: list[DeliveryOut]
    next_cursor: str | None = Field(description="Pass as `before` for older deliveries.")
