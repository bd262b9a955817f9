"""The organization's decision: what a person decides, how runs join it, how it releases them.

Every change takes the decision's row lock first (`repository.lock`), then any run's: one lock
order everywhere. A person's choice records one Mosaic step on the decision (never on a run), so
a run cancelled or expired meanwhile cannot lose what Mosaic did for its organization.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.accounts.models import Account
from app.blocked_runs import repository as runs
from app.blocked_runs.models import BlockedRun, Job
from app.blocked_runs.state_machine import (
    ACTIONS as RUN_ACTIONS,
)
from app.blocked_runs.state_machine import (
    Action,
    Event,
    IllegalTransition,
    State,
    release,
    target_of,
)
from app.blocked_runs.state_machine import (
    transition as run_transition,
)
from app.errors import InvalidInput
from app.organizations import repository, spend_guard
from app.organizations.models import Decision, DecisionHistoryEntry
from app.organizations.state_machine import (
    DecisionState,
    require_action,
    transition,
    update_fields,
)
from app.runtime import Runtime
from app.work_queue import JobKind, enqueue, enqueue_decision_job

SYSTEM = "system"
# Runs moved in the transaction that moves the decision; the rest by a release job in batches,
# so neither a person's request nor a step's lease waits on a large organization.
INLINE_RELEASE = 200
RELEASE_BATCH = 1000
CHECKOUT_BATCH = 100
# How a newly blocked run joins a decision that is waiting on a person: the event that would
# have brought it there.
_JOIN_EVENT = {
    DecisionState.AWAITING_CHOICE: Event.PLAN_FREE,
    DecisionState.AWAITING_CHECKOUT: Event.CHECKOUT_REQUIRED,
    DecisionState.TOPUP_PROMPT: Event.PLAN_PAID,
    DecisionState.DECIDED: Event.ORG_TOPUP_ANSWERED,
}


def _join_reason(state: DecisionState) -> str:
    return f"the organization's decision is {state.value}"


@dataclass(frozen=True)
class JoinMove:
    decision_state: DecisionState
    event: Event
    run_state: State
    reason: str


def join_moves() -> list[JoinMove]:
    """How a new run joins a decision that waits on a person: what `join` does, as data for the
    webhook path that opens and joins a run in one statement (`app.webhooks.ingest`)."""
    return [
        JoinMove(state, event, target_of(State.CHECKING_PLAN, event), _join_reason(state))
        for state, event in _JOIN_EVENT.items()
        if state is not DecisionState.DECIDED
    ]


@dataclass
class DecisionView:
    decision: Decision
    pending_step: JobKind | None
    runs_waiting: int
    history: list[DecisionHistoryEntry]
    monthly_topup_cap_usd: Decimal | None = None

    @property
    def topup_price(self) -> spend_guard.TopupPrice | None:
        return spend_guard.price_for(self.decision.plan, self.decision.plans)


async def topup_cap(session: AsyncSession, account_id: uuid.UUID) -> Decimal | None:
    """The account's monthly cap on auto top-up spend (None: no cap)."""
    cap: Decimal | None = await session.scalar(
        select(Account.monthly_topup_cap_usd).where(Account.id == account_id)
    )
    return cap


async def decide(
    rt: Runtime,
    session: AsyncSession,
    decision: Decision,
    event: Event,
    *,
    actor: str,
    reason: str,
    acting_run: uuid.UUID | None = None,
    **changes: Any,
) -> Decision:
    """Move the decision, and the runs waiting on it after it (set-based, bounded); the run a
    person acted through (`acting_run`) first, and as theirs in its history."""
    decision = await transition(session, decision, event, actor=actor, reason=reason, **changes)
    await release_runs(
        rt,
        session,
        decision,
        actor=actor,
        limit=INLINE_RELEASE,
        enqueue_rest=True,
        acting_run=acting_run,
    )
    return decision


async def release_runs(
    rt: Runtime,
    session: AsyncSession,
    decision: Decision,
    *,
    actor: str,
    limit: int,
    enqueue_rest: bool,
    acting_run: uuid.UUID | None = None,
) -> int:
    """Move up to `limit` waiting runs by the decision's last event; a job moves the rest."""
    if decision.last_event is None:
        return 0
    event = Event(decision.last_event)
    give_up = event is Event.GIVE_UP
    moved = await release(
        session,
        decision.account_id,
        event,
        actor=actor,
        reason=f"the organization's decision: {event.value.replace('_', ' ')}",
        limit=limit,
        give_up_after_seconds=rt.settings.give_up_after.total_seconds(),
        error_code=decision.error_code if give_up else None,
        error_message=decision.error_message if give_up else None,
        acting_run=acting_run,
    )
    if moved >= limit and enqueue_rest:
        await enqueue_decision_job(
            session,
            JobKind.RELEASE_RUNS,
            account_id=decision.account_id,
            give_up_after=rt.settings.give_up_after,
        )
    return moved


async def join(rt: Runtime, session: AsyncSession, decision: Decision, run: BlockedRun) -> None:
    """A run (just opened or retried, in `checking_plan`) starts waiting on the decision.

    The caller holds the decision's lock (shared is enough: joining never moves the decision),
    so the run sees the decision as it is and no move of the decision can pass it by. When the
    plan is a question again, the decision's check is recorded; the check itself opens the new
    round (`steps.check_plan`).
    """
    state = DecisionState(decision.state)
    if state is DecisionState.DECIDED and not await _decision_covers(rt, session, decision, run):
        state = DecisionState.IDLE  # a new block after the answer: the plan is a question again
    if state is DecisionState.IDLE:
        await enqueue_decision_job(
            session,
            JobKind.CHECK_PLAN,
            account_id=run.account_id,
            give_up_after=rt.settings.give_up_after,
        )
        return
    if state is DecisionState.CHECKING_PLAN:
        return  # the check under way will move it
    event = _JOIN_EVENT[state]
    run = await run_transition(
        session,
        run,
        event,
        actor=SYSTEM,
        reason=_join_reason(state),
        plan=decision.plan,
        topup=decision.topup,
        chosen_plan_id=decision.chosen_plan_id,
    )
    if state is DecisionState.DECIDED:
        await enqueue(
            session,
            JobKind.RESUME,
            account_id=run.account_id,
            blocked_run_id=run.id,
            give_up_after=rt.settings.give_up_after,
        )


async def _decision_covers(
    rt: Runtime, session: AsyncSession, decision: Decision, run: BlockedRun
) -> bool:
    """Does the organization's answer serve this run too?

    It does for runs blocked before the answer landed (a retried run), for runs reported within
    `UNBLOCK_DECISION_GRACE` after it (Mosaic documents no delivery order, so a block reported
    late most likely happened before the answer), and while the answer's release is still under
    way. A run that blocks again later asks again: the resume-loop bound keeps a wrong guess
    from looping.
    """
    if decision.decided_at is None:
        return False
    if run.created_at <= decision.decided_at + rt.settings.decision_grace:
        return True
    return await repository.pending_job(session, run.account_id, JobKind.RELEASE_RUNS) is not None


async def read(rt: Runtime, account_id: uuid.UUID) -> DecisionView:
    """The caller's decision with its pending step, its waiting runs and recent history."""
    async with rt.db.sessions() as session:
        decision = await repository.get(session, account_id)
        cap = await topup_cap(session, account_id)
        if decision is None:
            decision = Decision(
                account_id=account_id,
                state=DecisionState.IDLE.value,
                version=0,
                round=0,
                created_at=datetime.now(UTC),
                updated_at=datetime.now(UTC),
            )
            return DecisionView(decision, None, 0, [], cap)
        return DecisionView(
            decision,
            await repository.pending_step(session, account_id),
            await repository.runs_waiting(session, account_id),
            list(await repository.history(session, account_id)),
            cap,
        )


async def _locked_for_action(
    session: AsyncSession,
    account_id: uuid.UUID,
    action: Action,
    via_run: uuid.UUID | None,
) -> Decision:
    """Lock the decision (then read the run it is asked through), and refuse what is not open."""
    decision = await repository.lock(session, account_id)
    if via_run is not None:
        run = await runs.get_for_account(session, account_id, via_run)
        if action not in RUN_ACTIONS[State(run.state)]:
            raise IllegalTransition(
                f"Cannot {action.value.replace('_', ' ')}: the run is {run.state}.",
                state=run.state,
                pending=False,
                actions=[a.value for a in RUN_ACTIONS[State(run.state)]],
            )
    elif await repository.runs_waiting(session, account_id) == 0:
        # Every run that asked was cancelled or expired: nothing to buy anything for.
        raise IllegalTransition(
            "No blocked run waits on the organization's decision.",
            code="nothing_waiting",
            state=decision.state,
        )
    step = await repository.pending_step(session, account_id)
    require_action(decision, action, step.value if step else None)
    return decision


async def choose_plan(
    rt: Runtime, account_id: uuid.UUID, plan_id: str, actor: str, *, via_run: uuid.UUID | None
) -> int | None:
    """Record the chosen plan and the purchase step; the job to attempt now (None: nothing to
    do, the same plan's checkout is open already)."""
    async with rt.db.transaction() as session:
        decision = await _locked_for_action(session, account_id, Action.CHOOSE_PLAN, via_run)
        offered = [p.get("id") for p in decision.plans or []]
        aliases = {a for p in decision.plans or [] for a in p.get("aliases") or []}
        if plan_id not in offered and plan_id not in aliases:
            raise InvalidInput(
                f"Plan {plan_id!r} was not offered; choose one of {offered}.",
                code="plan_not_offered",
                offered=offered,
            )
        if decision.state == DecisionState.AWAITING_CHECKOUT and decision.chosen_plan_id == plan_id:
            return None  # a second click on the same plan: its checkout is the one open
        await update_fields(
            session, decision, chosen_plan_id=plan_id, error_code=None, error_message=None
        )
        return await _person_step(
            rt, session, account_id, JobKind.UPGRADE_PLAN, actor, via_run, plan_id=plan_id
        )


async def confirm_checkout(
    rt: Runtime, account_id: uuid.UUID, actor: str, *, via_run: uuid.UUID | None
) -> int:
    """A person says checkout is done: record a fresh GET /plan to check it."""
    async with rt.db.transaction() as session:
        await _locked_for_action(session, account_id, Action.CONFIRM_CHECKOUT, via_run)
        return await _person_step(rt, session, account_id, JobKind.CONFIRM_CHECKOUT, actor, via_run)


async def answer_topup(
    rt: Runtime,
    account_id: uuid.UUID,
    actor: str,
    *,
    enable: bool,
    threshold: int | None,
    quantity: int | None,
    via_run: uuid.UUID | None,
) -> int | None:
    """Enable auto top-up (a Mosaic step, returned) or decline it (decided at once: None)."""
    async with rt.db.transaction() as session:
        decision = await _locked_for_action(session, account_id, Action.TOPUP, via_run)
        if enable:
            if threshold is None or quantity is None:
                raise InvalidInput(
                    "Enabling auto top-up needs threshold and quantity.", code="topup_incomplete"
                )
            price = spend_guard.price_for(decision.plan, decision.plans)
            if refused := spend_guard.refusal(
                await topup_cap(session, account_id), price, quantity
            ):
                raise refused
            return await _person_step(
                rt,
                session,
                account_id,
                JobKind.SET_TOPUP,
                actor,
                via_run,
                threshold=threshold,
                quantity=quantity,
            )
        await decide(
            rt,
            session,
            decision,
            Event.TOPUP_DECLINED,
            actor=actor,
            reason="auto top-up declined",
            acting_run=via_run,
            topup={**(decision.topup or {}), "enabled": False},
            decided_at=func.now(),
            error_code=None,
            error_message=None,
        )
        return None


async def _person_step(
    rt: Runtime,
    session: AsyncSession,
    account_id: uuid.UUID,
    kind: JobKind,
    actor: str,
    via_run: uuid.UUID | None,
    **payload: object,
) -> int:
    # Held from workers while the request itself tries it (see work_queue.enqueue). The step's
    # moves are recorded as the person's: they asked for them (and the run they asked through).
    via = {"via_run": str(via_run)} if via_run is not None else {}
    job_id = await enqueue_decision_job(
        session,
        kind,
        account_id=account_id,
        payload={**payload, **via, "requested_by": actor},
        give_up_after=rt.settings.give_up_after,
        hold_for=rt.settings.action_deadline,
    )
    if job_id is None:  # the unique index caught a step recorded by another path meanwhile
        raise IllegalTransition(
            "The organization's decision is in progress; wait for it to finish.",
            code="decision_in_progress",
        )
    return job_id


async def resume_step_of(rt: Runtime, blocked_run_id: uuid.UUID) -> int | None:
    """The run's pending resume step, if the decision released it into `resuming`."""
    async with rt.db.sessions() as session:
        return await session.scalar(
            select(Job.id).where(
                Job.blocked_run_id == blocked_run_id,
                Job.status == "pending",
                Job.kind == JobKind.RESUME.value,
            )
        )


async def expire_checkouts(rt: Runtime) -> int:
    """Checkouts open longer than UNBLOCK_CHECKOUT_TTL go back to a choice (with their runs)."""
    ttl = rt.settings.checkout_ttl
    expired = 0
    async with rt.db.transaction() as session:
        stale = (
            (
                await session.execute(
                    select(Decision)
                    .where(
                        Decision.state == DecisionState.AWAITING_CHECKOUT.value,
                        Decision.checkout_opened_at < func.now() - ttl,
                    )
                    .limit(CHECKOUT_BATCH)
                    .with_for_update(key_share=True, skip_locked=True)
                )
            )
            .scalars()
            .all()
        )
        for decision in stale:
            if await repository.pending_step(session, decision.account_id) is not None:
                continue  # a person's step is under way; it decides
            await decide(
                rt,
                session,
                decision,
                Event.CHECKOUT_EXPIRED,
                actor=SYSTEM,
                reason=f"the checkout stayed open longer than {ttl}",
                checkout_url=None,
                checkout_opened_at=None,
                chosen_plan_id=None,
                error_code="checkout_expired",
                error_message="The checkout expired before it was paid. Choose a plan again.",
            )
            await session.execute(
                update(Job)
                .where(
                    Job.account_id == decision.account_id,
                    Job.kind == JobKind.POLL_CHECKOUT.value,
                    Job.status == "pending",
                )
                .values(status="cancelled", finished_at=func.now(), locked_until=None)
            )
            expired += 1
    return expired
