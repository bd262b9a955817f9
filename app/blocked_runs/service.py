"""What people and services may do to a blocked run. Each action commits its intent first;
the plan, checkout and top-up actions act on the run's organization's decision."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from enum import StrEnum

from sqlalchemy import and_, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from app.blocked_runs import repository
from app.blocked_runs.models import BlockedRun, HistoryEntry, Job
from app.blocked_runs.state_machine import (
    Action,
    Event,
    IllegalTransition,
    State,
    open_episode,
    require_action,
    transition,
)
from app.errors import InvalidInput
from app.organizations import repository as organizations_repository
from app.organizations import service as organizations
from app.organizations.models import Decision
from app.runtime import Runtime
from app.work_queue import JobKind, enqueue_verification


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
    """Open an episode waiting on the organization's decision; None if one is open already."""
    # The decision's lock first (the one lock order), so the run joins the decision as it is;
    # shared, so one organization's runs open side by side.
    decision = await organizations_repository.lock_shared(session, account_id)
    opened = await open_episode(
        session,
        account_id=account_id,
        run_id=run_id,
        agent_id=agent_id,
        actor=actor,
        reason=reason,
    )
    if opened is not None:
        await organizations.join(rt, session, decision, await session.get_one(BlockedRun, opened))
    return opened


class Registration(StrEnum):
    CREATED = "created"  # a new blocked run
    EXISTING = "existing"  # the run's open blocked run
    VERIFYING = "verifying"  # the run was blocked before: Mosaic is being asked
    NOT_BLOCKED = "not_blocked"  # Mosaic says the run is not blocked: its last episode


async def register(
    rt: Runtime, account_id: uuid.UUID, run_id: str, agent_id: str | None, actor: str
) -> tuple[Registration, BlockedRun | None, int | None]:
    """An internal service reports a credit-blocked run.

    The first report of a run is trusted, like Mosaic's first flagged event. A run with earlier
    episodes is verified with Mosaic first, as a webhook would be: it may have been resumed a
    moment ago, and a second episode must not open on a stale report: then the answer is
    VERIFYING with the verification job to attempt now (see `verified_registration`).
    """
    async with rt.db.transaction() as session:
        existing = await repository.open_episode_for(session, account_id, run_id)
        if existing is not None:
            return Registration.EXISTING, existing, None
        if await repository.latest_episode(session, account_id, run_id) is None:
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
                return Registration.CREATED, await session.get_one(BlockedRun, opened), None
            existing = await repository.open_episode_for(session, account_id, run_id)
            if existing is None:  # closed between our insert and this read: rare, ask to retry
                raise IllegalTransition("The run changed concurrently; try again.")
            return Registration.EXISTING, existing, None
        job_id = await enqueue_verification(
            session,
            account_id=account_id,
            run_id=run_id,
            agent_id=agent_id,
            give_up_after=rt.settings.give_up_after,
            hold_for=rt.settings.action_deadline,
        )
    return Registration.VERIFYING, None, job_id


async def verified_registration(
    rt: Runtime, account_id: uuid.UUID, run_id: str, job_id: int
) -> tuple[Registration, BlockedRun | None]:
    """Where a registration stands after its verification was attempted."""
    async with rt.db.sessions() as session:
        opened_run = await repository.open_episode_for(session, account_id, run_id)
        if opened_run is not None:
            return Registration.CREATED, opened_run
        still = await session.scalar(select(Job.status).where(Job.id == job_id))
        if still == "pending":
            return Registration.VERIFYING, None
        # Mosaic says the run is not blocked (resumed a moment ago, say): how it last ended.
        return Registration.NOT_BLOCKED, await repository.latest_episode(
            session, account_id, run_id
        )


async def read(
    rt: Runtime, account_id: uuid.UUID, blocked_run_id: uuid.UUID
) -> tuple[BlockedRun, Sequence[HistoryEntry], Decision | None]:
    """One of the caller's runs, its history, and the decision it waits on."""
    async with rt.db.sessions() as session:
        run = await repository.get_for_account(session, account_id, blocked_run_id)
        decision = await organizations_repository.get(session, account_id)
        return run, await repository.history(session, run.id), decision


async def choose_plan(
    rt: Runtime, account_id: uuid.UUID, blocked_run_id: uuid.UUID, plan_id: str, actor: str
) -> int | None:
    """Choose the organization's plan through one of its runs."""
    return await organizations.choose_plan(rt, account_id, plan_id, actor, via_run=blocked_run_id)


async def confirm_checkout(
    rt: Runtime, account_id: uuid.UUID, blocked_run_id: uuid.UUID, actor: str
) -> int:
    """Say the organization's checkout is done, through one of its runs."""
    return await organizations.confirm_checkout(rt, account_id, actor, via_run=blocked_run_id)


async def answer_topup(
    rt: Runtime,
    account_id: uuid.UUID,
    blocked_run_id: uuid.UUID,
    actor: str,
    *,
    enable: bool,
    threshold: int | None,
    quantity: int | None,
) -> int | None:
    """Answer the organization's auto top-up question through one of its runs; the job to
    attempt now (the top-up step, or this run's resume once declined)."""
    job_id = await organizations.answer_topup(
        rt,
        account_id,
        actor,
        enable=enable,
        threshold=threshold,
        quantity=quantity,
        via_run=blocked_run_id,
    )
    return job_id if job_id is not None else await organizations.resume_step_of(rt, blocked_run_id)


async def cancel(rt: Runtime, account_id: uuid.UUID, blocked_run_id: uuid.UUID, actor: str) -> None:
    """Stop handling this run. Its organization's decision, and what Mosaic did, stay."""
    async with rt.db.transaction() as session:
        run = await repository.get_for_account(session, account_id, blocked_run_id, lock=True)
        require_action(run, Action.CANCEL)
        await transition(session, run, Event.CANCEL, actor=actor, reason="cancelled")


async def retry(
    rt: Runtime, account_id: uuid.UUID, blocked_run_id: uuid.UUID, actor: str
) -> int | None:
    """Start a failed run over: it waits on its organization's decision again."""
    async with rt.db.transaction() as session:
        decision = await organizations_repository.lock(session, account_id)
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
        await organizations.join(rt, session, decision, run)
        return await session.scalar(
            select(Job.id).where(
                Job.status == "pending",
                or_(
                    Job.blocked_run_id == run.id,
                    and_(
                        Job.account_id == account_id,
                        Job.kind == JobKind.CHECK_PLAN.value,
                    ),
                ),
            )
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
