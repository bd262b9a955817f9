"""What people and services may do to a blocked run. Each action commits its intent first."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from app.blocked_runs import repository
from app.blocked_runs.models import BlockedRun, HistoryEntry
from app.blocked_runs.state_machine import (
    Action,
    Event,
    IllegalTransition,
    State,
    open_episode,
    require_action,
    transition,
    update_fields,
)
from app.blocked_runs.steps import organization_topup_answered
from app.errors import InvalidInput
from app.runtime import Runtime
from app.work_queue import JobKind, enqueue


async def open_blocked_run(
    rt: Runtime,
    session: AsyncSession,
    *,
    account_id: uuid.UUID,
    run_id: str,
    agent_id: str | None,
    actor: str,
    reason: str,
) -> uuid.UUID | None:
    """Open an episode and record its first step (GET /plan); None if one is open already."""
    opened = await open_episode(
        session,
        account_id=account_id,
        run_id=run_id,
        agent_id=agent_id,
        actor=actor,
        reason=reason,
    )
    if opened is not None:
        await enqueue(
            session,
            JobKind.CHECK_PLAN,
            account_id=account_id,
            blocked_run_id=opened,
            give_up_after=rt.settings.give_up_after,
        )
    return opened


async def register(
    rt: Runtime, account_id: uuid.UUID, run_id: str, agent_id: str | None, actor: str
) -> tuple[BlockedRun, bool]:
    """An internal service reports a credit-blocked run: (run, created)."""
    async with rt.db.transaction() as session:
        opened = await open_blocked_run(
            rt,
            session,
            account_id=account_id,
            run_id=run_id,
            agent_id=agent_id,
            actor=actor,
            reason="registered by an internal service",
        )
        if opened is not None:
            return await session.get_one(BlockedRun, opened), True
        existing = await repository.open_episode_for(session, account_id, run_id)
        if existing is None:  # closed between our insert and this read: rare, ask to retry
            raise IllegalTransition("The run changed concurrently; try again.")
        return existing, False


async def read(
    rt: Runtime, account_id: uuid.UUID, blocked_run_id: uuid.UUID
) -> tuple[BlockedRun, Sequence[HistoryEntry]]:
    async with rt.db.sessions() as session:
        run = await repository.get_for_account(session, account_id, blocked_run_id)
        return run, await repository.history(session, run.id)


async def choose_plan(
    rt: Runtime, account_id: uuid.UUID, blocked_run_id: uuid.UUID, plan_id: str, actor: str
) -> int:
    """Record the chosen plan and the upgrade it needs; returns the job to attempt now."""
    async with rt.db.transaction() as session:
        run = await repository.get_for_account(session, account_id, blocked_run_id, lock=True)
        require_action(run, Action.CHOOSE_PLAN)
        offered = [p.get("id") for p in run.plans or []]
        aliases = {a for p in run.plans or [] for a in p.get("aliases") or []}
        if plan_id not in offered and plan_id not in aliases:
            raise InvalidInput(
                f"Plan {plan_id!r} was not offered; choose one of {offered}.",
                code="plan_not_offered",
                offered=offered,
            )
        await update_fields(
            session, run, chosen_plan_id=plan_id, error_code=None, error_message=None
        )
        return await _person_step(rt, session, run, JobKind.UPGRADE_PLAN, actor, plan_id=plan_id)


async def confirm_checkout(
    rt: Runtime, account_id: uuid.UUID, blocked_run_id: uuid.UUID, actor: str
) -> int:
    """A person says checkout is done: record a fresh GET /plan to check it."""
    async with rt.db.transaction() as session:
        run = await repository.get_for_account(session, account_id, blocked_run_id, lock=True)
        require_action(run, Action.CONFIRM_CHECKOUT)
        return await _person_step(rt, session, run, JobKind.CONFIRM_CHECKOUT, actor)


async def answer_topup(
    rt: Runtime,
    account_id: uuid.UUID,
    blocked_run_id: uuid.UUID,
    actor: str,
    *,
    enable: bool,
    threshold: int | None,
    quantity: int | None,
) -> int:
    """Enable auto top-up (a Mosaic call) or decline it (resume at once); for the organization."""
    async with rt.db.transaction() as session:
        await repository.lock_account(session, account_id)  # declining moves the siblings
        run = await repository.get_for_account(session, account_id, blocked_run_id, lock=True)
        require_action(run, Action.TOPUP)
        if enable:
            if threshold is None or quantity is None:
                raise InvalidInput(
                    "Enabling auto top-up needs threshold and quantity.", code="topup_incomplete"
                )
            return await _person_step(
                rt, session, run, JobKind.SET_TOPUP, actor, threshold=threshold, quantity=quantity
            )
        topup = {**(run.topup or {}), "enabled": False}
        run = await transition(
            session,
            run,
            Event.TOPUP_DECLINED,
            actor=actor,
            reason="auto top-up declined",
            topup=topup,
            error_code=None,
            error_message=None,
        )
        job_id = await _person_step(rt, session, run, JobKind.RESUME, actor)
        await organization_topup_answered(rt, session, run)
        return job_id


async def cancel(rt: Runtime, account_id: uuid.UUID, blocked_run_id: uuid.UUID, actor: str) -> None:
    async with rt.db.transaction() as session:
        run = await repository.get_for_account(session, account_id, blocked_run_id, lock=True)
        require_action(run, Action.CANCEL)
        await transition(session, run, Event.CANCEL, actor=actor, reason="cancelled")


async def retry(rt: Runtime, account_id: uuid.UUID, blocked_run_id: uuid.UUID, actor: str) -> int:
    """Start a failed run over from reading the plan, unless the run has another open episode."""
    async with rt.db.transaction() as session:
        run = await repository.get_for_account(session, account_id, blocked_run_id, lock=True)
        require_action(run, Action.RETRY)
        if await repository.open_episode_for(session, account_id, run.run_id) is not None:
            raise IllegalTransition(
                "This Mosaic run has another open blocked run; act on that one.",
                code="episode_open",
                state=run.state,
            )
        try:
            async with session.begin_nested():
                run = await transition(
                    session,
                    run,
                    Event.RETRY,
                    actor=actor,
                    reason="retried",
                    error_code=None,
                    error_message=None,
                    checkout_url=None,
                )
        except IntegrityError as exc:
            raise IllegalTransition(
                "This Mosaic run has another open blocked run.", code="episode_open"
            ) from exc
        return await _person_step(rt, session, run, JobKind.CHECK_PLAN, actor)


async def _person_step(
    rt: Runtime,
    session: AsyncSession,
    run: BlockedRun,
    kind: JobKind,
    actor: str,
    **payload: object,
) -> int:
    # Held from workers while the request itself tries it (see work_queue.enqueue). The step's
    # transitions are recorded as the person's: they asked for them.
    return await enqueue(
        session,
        kind,
        account_id=run.account_id,
        blocked_run_id=run.id,
        payload={**payload, "requested_by": actor},
        give_up_after=rt.settings.give_up_after,
        hold_for=rt.settings.action_deadline,
    )


def states_filter(raw: str | None) -> list[State]:
    if not raw:
        return []
    states = []
    for name in (part.strip() for part in raw.split(",")):
        if not name:
            continue
        try:
            states.append(State(name))
        except ValueError as exc:
            raise InvalidInput(
                f"Unknown state {name!r}; states are {[s.value for s in State]}.",
                code="invalid_state_filter",
            ) from exc
    return states
