"""The organization's decision: one declared table, one way to change its state.

The same discipline as a blocked run's table, one level up. `transition()` is the only code that
writes a decision's `state`: a guarded UPDATE (expected state and version) plus a history row, in
the caller's transaction. The runs waiting on the decision follow it: `RUN_STATE_FOR` says where
a run stands while its organization's decision is in each state, and the run table
(`app.blocked_runs.state_machine.TRANSITIONS`) has the same events to move them there.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.blocked_runs.state_machine import Action, Event, IllegalTransition, State
from app.notifications import RUN_EVENTS_CHANNEL, notify
from app.organizations.models import Decision, DecisionHistoryEntry
from app.subscriptions import outbox
from app.work_queue import organization_key


class DecisionState(StrEnum):
    IDLE = "idle"  # nothing asked: no blocked run has made the plan a question yet
    CHECKING_PLAN = "checking_plan"  # GET /plan under way for a newly blocked run
    AWAITING_CHOICE = "awaiting_choice"  # no paid plan: a person chooses one
    AWAITING_CHECKOUT = "awaiting_checkout"  # a hosted checkout is open
    TOPUP_PROMPT = "topup_prompt"  # paid plan: a person answers the auto top-up question
    DECIDED = "decided"  # paid, and auto top-up answered (or already on): runs resume


D, E = DecisionState, Event
# Where the decision's runs stand while it is in each state (None: no run waits on it).
RUN_STATE_FOR: dict[DecisionState, State | None] = {
    D.IDLE: None,
    D.CHECKING_PLAN: State.CHECKING_PLAN,
    D.AWAITING_CHOICE: State.AWAITING_CHOICE,
    D.AWAITING_CHECKOUT: State.AWAITING_CHECKOUT,
    D.TOPUP_PROMPT: State.TOPUP_PROMPT,
    D.DECIDED: State.RESUMING,
}
OPEN_STATES = frozenset({D.CHECKING_PLAN, D.AWAITING_CHOICE, D.AWAITING_CHECKOUT, D.TOPUP_PROMPT})
_CHOOSING = (D.CHECKING_PLAN, D.AWAITING_CHOICE, D.AWAITING_CHECKOUT)

TRANSITIONS: dict[tuple[DecisionState, Event], DecisionState] = {
    # A newly blocked run makes the organization's plan a question (again).
    (D.IDLE, E.BLOCKED): D.CHECKING_PLAN,
    (D.DECIDED, E.BLOCKED): D.CHECKING_PLAN,
    (D.CHECKING_PLAN, E.PLAN_FREE): D.AWAITING_CHOICE,
    # Mosaic shows a paid plan: after a check, a checkout, or a read before a purchase.
    **{(state, E.PLAN_PAID): D.TOPUP_PROMPT for state in _CHOOSING},
    **{(state, E.PLAN_PAID_TOPUP_ON): D.DECIDED for state in _CHOOSING},
    (D.AWAITING_CHOICE, E.UPGRADED): D.TOPUP_PROMPT,
    (D.AWAITING_CHECKOUT, E.UPGRADED): D.TOPUP_PROMPT,  # chose again, immediate this time
    (D.AWAITING_CHOICE, E.CHECKOUT_REQUIRED): D.AWAITING_CHECKOUT,
    (D.AWAITING_CHECKOUT, E.CHECKOUT_REQUIRED): D.AWAITING_CHECKOUT,  # another plan replaces it
    (D.AWAITING_CHECKOUT, E.CHECKOUT_CONFIRMED): D.TOPUP_PROMPT,
    (D.AWAITING_CHECKOUT, E.CHECKOUT_EXPIRED): D.AWAITING_CHOICE,
    (D.TOPUP_PROMPT, E.TOPUP_ENABLED): D.DECIDED,
    (D.TOPUP_PROMPT, E.TOPUP_DECLINED): D.DECIDED,
    # Mosaic stayed unreachable: the waiting runs fail (a retry starts a new round).
    **{(state, E.GIVE_UP): D.IDLE for state in OPEN_STATES},
}

# What a person may decide in each state (while no Mosaic step of the decision is under way).
ACTIONS: dict[DecisionState, tuple[Action, ...]] = {
    D.AWAITING_CHOICE: (Action.CHOOSE_PLAN,),
    D.AWAITING_CHECKOUT: (Action.CONFIRM_CHECKOUT, Action.CHOOSE_PLAN),
    D.TOPUP_PROMPT: (Action.TOPUP,),
}


def actions_for(state: str, *, pending: bool) -> list[str]:
    return [] if pending else [a.value for a in ACTIONS.get(DecisionState(state), ())]


class DecisionInProgress(IllegalTransition):
    code = "decision_in_progress"


def require_action(decision: Decision, action: Action, pending_step: str | None) -> None:
    """Refuse what the decision does not offer now: 409 naming its state or its pending step."""
    if pending_step is not None:
        raise DecisionInProgress(
            f"The organization's decision is in progress ({pending_step.replace('_', ' ')}); "
            "wait for it to finish.",
            state=decision.state,
            pending=True,
            pending_step=pending_step,
            actions=[],
        )
    if action.value not in actions_for(decision.state, pending=False):
        raise IllegalTransition(
            f"Cannot {action.value.replace('_', ' ')}: the organization's decision is "
            f"{decision.state}.",
            state=decision.state,
            pending=False,
            actions=actions_for(decision.state, pending=False),
        )


def target_of(state: str, event: Event) -> DecisionState:
    target = TRANSITIONS.get((DecisionState(state), event))
    if target is None:
        raise IllegalTransition(
            f"Event {event.value} is not allowed for a decision in state {state}.", state=state
        )
    return target


async def transition(
    session: AsyncSession,
    decision: Decision,
    event: Event,
    *,
    actor: str,
    reason: str | None = None,
    **changes: Any,
) -> Decision:
    """Move the decision by `event`: one guarded UPDATE plus a history row, or a 409."""
    target = target_of(decision.state, event)
    new_round = event is E.BLOCKED
    stmt = (
        update(Decision)
        .where(
            Decision.account_id == decision.account_id,
            Decision.state == decision.state,
            Decision.version == decision.version,
        )
        .values(
            state=target.value,
            version=Decision.version + 1,
            round=Decision.round + (1 if new_round else 0),
            last_event=event.value,
            updated_at=func.now(),
            state_changed_at=func.now(),
            **changes,
        )
        .returning(Decision.round)
        .execution_options(synchronize_session=False)
    )
    round_ = (await session.execute(stmt)).scalar_one_or_none()
    if round_ is None:
        current = await session.scalar(
            select(Decision.state).where(Decision.account_id == decision.account_id)
        )
        raise IllegalTransition(
            f"The organization's decision changed concurrently; it is now {current}.",
            state=current,
        )
    entry: dict[str, Any] = {
        "account_id": decision.account_id,
        "round": round_,
        "from_state": decision.state,
        "to_state": target.value,
        "event": event.value,
        "actor": actor,
        "reason": reason,
    }
    if target not in ACTIONS:
        await session.execute(insert(DecisionHistoryEntry).values(**entry))
    else:
        # The decision now waits on a person: the history row plus `decision.needed` (naming
        # what is asked) for the account's subscribers, in one statement: the outbox.
        await outbox.record_decision_history_and_event(
            session, asks=actions_for(target.value, pending=False), **entry
        )
    await notify(session, RUN_EVENTS_CHANNEL, organization_key(decision.account_id))
    await session.refresh(decision)
    return decision


async def update_fields(session: AsyncSession, decision: Decision, **changes: Any) -> Decision:
    """Change a decision's data without changing its state (still versioned, never `state`)."""
    if "state" in changes:
        raise ValueError("state changes go through transition()")
    await session.execute(
        update(Decision)
        .where(Decision.account_id == decision.account_id)
        .values(version=Decision.version + 1, updated_at=func.now(), **changes)
        .execution_options(synchronize_session=False)
    )
    await notify(session, RUN_EVENTS_CHANNEL, organization_key(decision.account_id))
    await session.refresh(decision)
    return decision
