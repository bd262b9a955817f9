"""The organization's decision over HTTP."""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal

from pydantic import BaseModel, ConfigDict, Field

from app.blocked_runs.schemas import CurrentPlan, LastError, PlanOffer, Topup
from app.blocked_runs.state_machine import Action, Event
from app.organizations.service import DecisionView
from app.organizations.state_machine import DecisionState, actions_for
from app.work_queue import JobKind


class DecisionTransition(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    round: int
    from_state: DecisionState
    to_state: DecisionState
    event: Event
    actor: str
    reason: str | None
    at: datetime = Field(validation_alias="created_at")


class TopupPrice(BaseModel):
    """What auto top-up costs on the organization's plan (from Mosaic's plan list)."""

    plan_id: str
    rate_per_100_credits_usd: float
    credits_per_month: int | None = Field(
        description="The plan's monthly credits: a worst-case month is "
        "ceil(credits_per_month / quantity) top-ups."
    )


class OrganizationOut(BaseModel):
    """The one prompt per organization: what is being decided, and how many runs wait on it."""

    account_id: uuid.UUID
    state: DecisionState
    round: int = Field(description="How many times a blocked run made the plan a question.")
    pending: bool = Field(description="A Mosaic step of the decision is under way.")
    pending_step: JobKind | None = Field(description="Which one (e.g. upgrade_plan).")
    actions: list[Action] = Field(description="What the caller may decide now.")
    runs_waiting: int = Field(description="Blocked runs waiting on this decision.")
    plan: CurrentPlan | None
    plans: list[PlanOffer] | None
    chosen_plan_id: str | None
    checkout_url: str | None
    topup: Topup | None
    topup_price: TopupPrice | None = Field(
        description="One top-up costs quantity / 100 × rate; null when Mosaic listed no rate."
    )
    monthly_topup_cap_usd: Decimal | None = Field(
        description="The account's spend guard: auto top-up settings whose worst-case month "
        "costs more are refused (`topup_over_spend_cap`); null: no cap."
    )
    error: LastError | None
    decided_at: datetime | None
    version: int
    updated_at: datetime
    history: list[DecisionTransition]

    @classmethod
    def of(cls, view: DecisionView) -> OrganizationOut:
        d = view.decision
        pending = view.pending_step is not None
        choosing = d.state in (DecisionState.AWAITING_CHOICE, DecisionState.AWAITING_CHECKOUT)
        return cls(
            account_id=d.account_id,
            state=d.state,
            round=d.round,
            pending=pending,
            pending_step=view.pending_step,
            actions=actions_for(d.state, pending=pending),
            runs_waiting=view.runs_waiting,
            plan=d.plan,
            plans=d.plans if choosing else None,
            chosen_plan_id=d.chosen_plan_id,
            checkout_url=d.checkout_url if d.state == DecisionState.AWAITING_CHECKOUT else None,
            topup=Topup.model_validate(d.topup) if d.topup else None,
            topup_price=TopupPrice(**price.as_json()) if (price := view.topup_price) else None,
            monthly_topup_cap_usd=view.monthly_topup_cap_usd,
            error=LastError(code=d.error_code, message=d.error_message or "")
            if d.error_code
            else None,
            decided_at=d.decided_at,
            version=d.version,
            updated_at=d.updated_at,
            history=[DecisionTransition.model_validate(h) for h in view.history],
        )
