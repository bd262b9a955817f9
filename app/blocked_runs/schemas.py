"""Blocked runs over HTTP."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from app import input_text
from app.blocked_runs.models import BlockedRun, HistoryEntry
from app.blocked_runs.state_machine import DECIDING_STATES, Action, Event, State, actions_for
from app.input_text import StorableStr
from app.organizations.models import Decision

MAX_TOPUP = 1_000_000


class RegisterRun(BaseModel):
    model_config = ConfigDict(extra="forbid")

    run_id: StorableStr = Field(min_length=1, max_length=200, pattern=input_text.RUN_ID_PATTERN)
    agent_id: StorableStr | None = Field(default=None, max_length=200)


class ChoosePlan(BaseModel):
    model_config = ConfigDict(extra="forbid")

    plan_id: StorableStr = Field(min_length=1, max_length=100)


def _whole(value: object) -> object:
    # JSON does not tell 100 from 100.0 (JSON Schema calls both integers); strings and
    # booleans stay refused by the strict int below.
    return int(value) if isinstance(value, float) and value.is_integer() else value


WholeNumber = Annotated[int, BeforeValidator(_whole)]


class TopupEnable(BaseModel):
    """Turn auto top-up on: buy `quantity` credits whenever the balance falls below `threshold`."""

    model_config = ConfigDict(extra="forbid")

    enable: Literal[True]
    threshold: WholeNumber = Field(ge=0, le=MAX_TOPUP, strict=True)
    quantity: WholeNumber = Field(ge=0, le=MAX_TOPUP, strict=True)


class TopupDecline(BaseModel):
    """Leave auto top-up off."""

    model_config = ConfigDict(extra="forbid")

    enable: Literal[False]
    threshold: ClassVar[None] = None
    quantity: ClassVar[None] = None


TopupAnswer = Annotated[TopupEnable | TopupDecline, Field(discriminator="enable")]


class Topup(BaseModel):
    eligible: bool | None = None
    enabled: bool = False
    threshold: int = 0
    quantity: int = 0


class LastError(BaseModel):
    """The last problem shown to a person about this run (or its organization's decision)."""

    code: str
    message: str


class CurrentPlan(BaseModel):
    """The organization's plan as Mosaic last reported it (null: not reported)."""

    id: str | None = None
    family: str | None = None
    status: str | None = None
    current_period_end: str | None = None


class PlanOffer(BaseModel):
    """A plan offered while a plan is being chosen (from Mosaic's `GET /plan/list`)."""

    id: str = Field(description="The `plan_id` to send to choose-plan.")
    aliases: list[str] = Field(default_factory=list, description="Other ids for the same plan.")
    billing: str | None = None
    price_usd: float | None = None
    credits_per_month: float | None = None
    top_up_rate_per_100_credits_usd: float | None = None
    notes: str | None = None


class Transition(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    from_state: State | None
    to_state: State
    event: Event
    actor: str
    reason: str | None
    at: datetime = Field(validation_alias="created_at")


class BlockedRunOut(BaseModel):
    id: uuid.UUID
    account_id: uuid.UUID
    run_id: str
    agent_id: str | None
    state: State
    pending: bool = Field(description="A Mosaic call is under way for this run.")
    actions: list[Action] = Field(description="What the caller may do now.")
    plan: CurrentPlan | None
    plans: list[PlanOffer] | None = Field(description="Offered in `awaiting_choice`/checkout.")
    chosen_plan_id: str | None
    checkout_url: str | None
    topup: Topup | None
    error: LastError | None
    version: int
    created_at: datetime
    updated_at: datetime
    history: list[Transition] | None = None

    @classmethod
    def of(
        cls,
        run: BlockedRun,
        history: Sequence[HistoryEntry] | None = None,
        decision: Decision | None = None,
    ) -> BlockedRunOut:
        """The run as a person sees it. While it waits on its organization's decision, the
        decision's data (plans, checkout, top-up, its last problem) is the run's."""
        source: BlockedRun | Decision = run
        if decision is not None and run.state in DECIDING_STATES:
            source = decision
        choosing = run.state in (State.AWAITING_CHOICE, State.AWAITING_CHECKOUT)
        error = (
            LastError(code=source.error_code, message=source.error_message or "")
            if source.error_code
            else None
        )
        return cls(
            id=run.id,
            account_id=run.account_id,
            run_id=run.run_id,
            agent_id=run.agent_id,
            state=run.state,
            pending=run.pending,
            actions=actions_for(run.state, pending=run.pending),
            plan=source.plan,
            # Plans are offered while a plan is being chosen; afterwards they are history.
            plans=source.plans if choosing else None,
            chosen_plan_id=source.chosen_plan_id,
            checkout_url=source.checkout_url if run.state == State.AWAITING_CHECKOUT else None,
            topup=Topup.model_validate(source.topup) if source.topup else None,
            error=error,
            version=run.version,
            created_at=run.created_at,
            updated_at=run.updated_at,
            history=[Transition.model_validate(h) for h in history]
            if history is not None
            else None,
        )


class BlockedRunPage(BaseModel):
    items: list[BlockedRunOut]
    next_cursor: str | None
