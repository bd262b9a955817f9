"""The billing state machine of a blocked run: one declared table, one way to change state.

Read the table top to bottom like the one in design.md. `transition()` is the only code that
writes `state`: a guarded UPDATE (expected state and version) plus a history row, in the
caller's transaction. Anything not in the table is refused with a 409 naming the current state.
"""

from __future__ import annotations

import uuid
from enum import StrEnum
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from app import metrics
from app.blocked_runs.models import BlockedRun, HistoryEntry
from app.errors import Conflict
from app.notifications import RUN_EVENTS_CHANNEL, notify
from app.work_queue import cancel_pending


class State(StrEnum):
    CHECKING_PLAN = "checking_plan"
    AWAITING_CHOICE = "awaiting_choice"
    AWAITING_CHECKOUT = "awaiting_checkout"
    TOPUP_PROMPT = "topup_prompt"
    RESUMING = "resuming"
    RESUMED = "resumed"
    CANCELLED = "cancelled"
    FAILED = "failed"
    EXPIRED = "expired"


class Event(StrEnum):
    BLOCKED = "blocked"  # a credit-blocked run was detected or registered
    PLAN_FREE = "plan_free"  # GET /plan: no paid plan; plans listed
    PLAN_PAID = "plan_paid"  # GET /plan: paid, auto top-up off
    PLAN_PAID_TOPUP_ON = "plan_paid_topup_on"  # GET /plan: paid, auto top-up already on
    UPGRADED = "upgraded"  # POST /plan/upgrade switched the plan at once
    CHECKOUT_REQUIRED = "checkout_required"  # POST /plan/upgrade answered a checkout_url
    CHECKOUT_CONFIRMED = "checkout_confirmed"  # a fresh GET /plan shows a paid plan
    ORG_PLAN_PAID = "org_plan_paid"  # another run of the organization got it onto a paid plan
    TOPUP_ENABLED = "topup_enabled"  # POST /credits/settings succeeded
    TOPUP_DECLINED = "topup_declined"  # a person said no to auto top-up
    ORG_TOPUP_ANSWERED = "org_topup_answered"  # answered on another run of the organization
    RESUME_ACCEPTED = "resume_accepted"  # POST resume succeeded, or the run runs again already
    RESUME_REFUSED = "resume_refused"  # POST resume answered 409 and the run is not running
    RESUME_LIMIT = "resume_limit"  # the run keeps blocking again after resumes
    RUN_RESTARTED = "run_restarted"  # Mosaic says the run started again (resumed elsewhere)
    CANCEL = "cancel"
    GIVE_UP = "give_up"  # Mosaic stayed unreachable or refused a needed call
    EXPIRE = "expire"  # nobody answered within the decision TTL
    RETRY = "retry"


class Action(StrEnum):
    CHOOSE_PLAN = "choose_plan"
    CONFIRM_CHECKOUT = "confirm_checkout"
    TOPUP = "topup"
    CANCEL = "cancel"
    RETRY = "retry"


ACTIVE_STATES = frozenset(
    {
        State.CHECKING_PLAN,
        State.AWAITING_CHOICE,
        State.AWAITING_CHECKOUT,
        State.TOPUP_PROMPT,
        State.RESUMING,
    }
)
TERMINAL_STATES = frozenset(State) - ACTIVE_STATES
# States that wait for a person; they expire when nobody answers.
WAITING_STATES = frozenset({State.AWAITING_CHOICE, State.AWAITING_CHECKOUT, State.TOPUP_PROMPT})

S, E = State, Event
TRANSITIONS: dict[tuple[State | None, Event], State] = {
    (None, E.BLOCKED): S.CHECKING_PLAN,
    (S.CHECKING_PLAN, E.PLAN_FREE): S.AWAITING_CHOICE,
    (S.CHECKING_PLAN, E.PLAN_PAID): S.TOPUP_PROMPT,
    (S.CHECKING_PLAN, E.PLAN_PAID_TOPUP_ON): S.RESUMING,
    (S.AWAITING_CHOICE, E.UPGRADED): S.TOPUP_PROMPT,
    (S.AWAITING_CHOICE, E.CHECKOUT_REQUIRED): S.AWAITING_CHECKOUT,
    (S.AWAITING_CHOICE, E.ORG_PLAN_PAID): S.TOPUP_PROMPT,
    (S.AWAITING_CHECKOUT, E.CHECKOUT_CONFIRMED): S.TOPUP_PROMPT,
    (S.AWAITING_CHECKOUT, E.UPGRADED): S.TOPUP_PROMPT,  # chose again, immediate this time
    (S.AWAITING_CHECKOUT, E.CHECKOUT_REQUIRED): S.AWAITING_CHECKOUT,  # chose another plan
    (S.AWAITING_CHECKOUT, E.ORG_PLAN_PAID): S.TOPUP_PROMPT,
    (S.TOPUP_PROMPT, E.TOPUP_ENABLED): S.RESUMING,
    (S.TOPUP_PROMPT, E.TOPUP_DECLINED): S.RESUMING,
    (S.TOPUP_PROMPT, E.ORG_TOPUP_ANSWERED): S.RESUMING,
    (S.RESUMING, E.RESUME_ACCEPTED): S.RESUMED,
    (S.RESUMING, E.RESUME_REFUSED): S.FAILED,
    (S.RESUMING, E.RESUME_LIMIT): S.FAILED,
    **{(state, E.RUN_RESTARTED): S.RESUMED for state in ACTIVE_STATES},
    **{(state, E.CANCEL): S.CANCELLED for state in ACTIVE_STATES},
    **{(state, E.GIVE_UP): S.FAILED for state in ACTIVE_STATES},
    **{(state, E.EXPIRE): S.EXPIRED for state in WAITING_STATES},
    (S.FAILED, E.RETRY): S.CHECKING_PLAN,
}

# What a person or service may ask for in each state (while no system step is under way).
ACTIONS: dict[State, tuple[Action, ...]] = {
    S.CHECKING_PLAN: (Action.CANCEL,),
    S.AWAITING_CHOICE: (Action.CHOOSE_PLAN, Action.CANCEL),
    S.AWAITING_CHECKOUT: (Action.CONFIRM_CHECKOUT, Action.CHOOSE_PLAN, Action.CANCEL),
    S.TOPUP_PROMPT: (Action.TOPUP, Action.CANCEL),
    S.RESUMING: (Action.CANCEL,),
    S.RESUMED: (),
    S.CANCELLED: (),
    S.FAILED: (Action.RETRY,),
    S.EXPIRED: (),
}


def actions_for(state: str, *, pending: bool) -> list[str]:
    allowed = ACTIONS[State(state)]
    if pending:
        # While Mosaic is being called for this run, a person may only cancel.
        allowed = tuple(a for a in allowed if a is Action.CANCEL)
    return [a.value for a in allowed]


class IllegalTransition(Conflict):
    code = "invalid_state"


def require_action(run: BlockedRun, action: Action) -> None:
    """Refuse an action the run's state does not offer, naming the state (409)."""
    if action.value not in actions_for(run.state, pending=run.pending):
        why = "a system step is under way" if run.pending else f"the run is {run.state}"
        raise IllegalTransition(
            f"Cannot {action.value.replace('_', ' ')}: {why}.",
            state=run.state,
            pending=run.pending,
            actions=actions_for(run.state, pending=run.pending),
        )


def target_of(state: str | None, event: Event) -> State:
    current = State(state) if state is not None else None
    target = TRANSITIONS.get((current, event))
    if target is None:
        raise IllegalTransition(
            f"Event {event.value} is not allowed in state {state}.", state=state
        )
    return target


async def _record(
    session: AsyncSession,
    run_id: uuid.UUID,
    from_state: str | None,
    to_state: State,
    event: Event,
    actor: str,
    reason: str | None,
) -> None:
    await session.execute(
        insert(HistoryEntry).values(
            blocked_run_id=run_id,
            from_state=from_state,
            to_state=to_state.value,
            event=event.value,
            actor=actor,
            reason=reason,
        )
    )
    await notify(session, RUN_EVENTS_CHANNEL, str(run_id))
    metrics.TRANSITIONS.labels(from_state or "", to_state.value).inc()


async def open_episode(
    session: AsyncSession,
    *,
    account_id: uuid.UUID,
    run_id: str,
    agent_id: str | None,
    actor: str,
    reason: str,
) -> uuid.UUID | None:
    """Insert a blocked run in its first state; its id, or None if an episode is open already."""
    state = target_of(None, Event.BLOCKED)
    new_id = uuid.uuid4()
    stmt = (
        pg_insert(BlockedRun)
        .values(id=new_id, account_id=account_id, run_id=run_id, agent_id=agent_id, state=state)
        .on_conflict_do_nothing()
        .returning(BlockedRun.id)
    )
    created = (await session.execute(stmt)).scalar_one_or_none()
    if created is None:
        return None
    await _record(session, new_id, None, state, Event.BLOCKED, actor, reason)
    return new_id


async def transition(
    session: AsyncSession,
    run: BlockedRun,
    event: Event,
    *,
    actor: str,
    reason: str | None = None,
    **changes: Any,
) -> BlockedRun:
    """Move `run` by `event`: one guarded UPDATE plus a history row, or a 409."""
    target = target_of(run.state, event)
    stmt = (
        update(BlockedRun)
        .where(
            BlockedRun.id == run.id,
            BlockedRun.state == run.state,
            BlockedRun.version == run.version,
        )
        .values(
            state=target.value,
            version=BlockedRun.version + 1,
            updated_at=func.now(),
            state_changed_at=func.now(),
            **changes,
        )
        .returning(BlockedRun.id)
        .execution_options(synchronize_session=False)
    )
    if (await session.execute(stmt)).scalar_one_or_none() is None:
        current = await session.scalar(select(BlockedRun.state).where(BlockedRun.id == run.id))
        raise IllegalTransition(
            f"The run changed concurrently; it is now {current}.", state=current
        )
    if target in TERMINAL_STATES:
        # Nothing is left to do for this episode: an in-flight step loses its lease and its
        # outcome, and no further Mosaic call is made for it.
        await cancel_pending(session, run.id)
    await _record(session, run.id, run.state, target, event, actor, reason)
    await session.refresh(run)
    return run


async def update_fields(session: AsyncSession, run: BlockedRun, **changes: Any) -> BlockedRun:
    """Change a run's data without changing its state (still versioned, never `state`)."""
    if "state" in changes:
        raise ValueError("state changes go through transition()")
    stmt = (
        update(BlockedRun)
        .where(BlockedRun.id == run.id, BlockedRun.version == run.version)
        .values(version=BlockedRun.version + 1, updated_at=func.now(), **changes)
        .returning(BlockedRun.id)
        .execution_options(synchronize_session=False)
    )
    if (await session.execute(stmt)).scalar_one_or_none() is None:
        raise IllegalTransition("The run changed concurrently.", state=run.state)
    await notify(session, RUN_EVENTS_CHANNEL, str(run.id))
    await session.refresh(run)
    return run
