"""Blocked runs over HTTP."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app import input_text
from app.blocked_runs.models import BlockedRun, HistoryEntry
from app.blocked_runs.state_machine import DECIDING_STATES, State, actions_for
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


class TopupAnswer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enable: bool
    threshold: int | None = Field(default=None, ge=0, le=MAX_TOPUP, strict=True)
    quantity: int | None = Field(default=None, ge=0, le=MAX_TOPUP, strict=True)

    @model_validator(mode="after")
    def _values_when_enabling(self) -> TopupAnswer:
        if self.enable and (self.threshold is None or self.quantity is None):
            raise ValueError("enabling auto top-up needs threshold and quantity")
        return self


class Topup(BaseModel):
    eligible: bool | None = None
    enabled: bool = False
    threshold: int = 0
    quantity: int = 0


class Problem(BaseModel):
    code: str
    message: str


class Transition(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    from_state: str | None
    to_state: str
    event: str
    actor: str
    reason: str | None
    at: datetime = Field(validation_alias="created_at")


class BlockedRunOut(BaseModel):
    id: uuid.UUID
    account_id: uuid.UUID
    run_id: str
    agent_id: str | None
    state: str
    pending: bool
    actions: list[str]
    plan: dict[str, Any] | None
    plans: list[dict[str, Any]] | None
    chosen_plan_id: str | None
    checkout_url: str | None
    topup: Topup | None
    error: Problem | None
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
            Problem(code=source.error_code, message=source.error_message or "")
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
