"""Every query on organization decisions; each one names the account."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from app.blocked_runs.models import BlockedRun, Job
from app.blocked_runs.state_machine import DECIDING_STATES
from app.organizations.models import Decision, DecisionHistoryEntry
from app.work_queue import DECISION_STEPS, JobKind


async def lock(session: AsyncSession, account_id: uuid.UUID) -> Decision:
    """Lock the account's decision (made on first use) to move it: the organization's mutex.

    FOR NO KEY UPDATE, so inserts that reference the account (runs, jobs, webhook rows) never
    wait on it, and it is taken before any run lock: one lock order everywhere, no deadlocks.
    """
    return await _locked(session, account_id, read=False)


async def lock_shared(session: AsyncSession, account_id: uuid.UUID) -> Decision:
    """Hold the decision still while a new run joins it (FOR SHARE).

    Runs of one organization open side by side, each seeing the decision as it is; a move of
    the decision waits for them, and they for it, so none joins a state that has just passed.
    """
    return await _locked(session, account_id, read=True)


async def _locked(session: AsyncSession, account_id: uuid.UUID, *, read: bool) -> Decision:
    stmt = (
        select(Decision)
        .where(Decision.account_id == account_id)
        .with_for_update(read=read, key_share=not read)
        .execution_options(populate_existing=True)
    )
    decision = (await session.execute(stmt)).scalar_one_or_none()
    if decision is None:
        await session.execute(
            pg_insert(Decision).values(account_id=account_id).on_conflict_do_nothing()
        )
        decision = (await session.execute(stmt)).scalar_one()
    return decision


async def get(session: AsyncSession, account_id: uuid.UUID) -> Decision | None:
    return await session.scalar(select(Decision).where(Decision.account_id == account_id))


async def pending_step(session: AsyncSession, account_id: uuid.UUID) -> JobKind | None:
    """The decision's Mosaic step under way, if any (at most one, by a unique index)."""
    kind = await session.scalar(
        select(Job.kind).where(
            Job.account_id == account_id,
            Job.status == "pending",
            Job.kind.in_([k.value for k in DECISION_STEPS]),
        )
    )
    return JobKind(kind) if kind else None


async def runs_waiting(session: AsyncSession, account_id: uuid.UUID) -> int:
    return (
        await session.scalar(
            select(func.count())
            .select_from(BlockedRun)
            .where(
                BlockedRun.account_id == account_id,
                BlockedRun.state.in_([s.value for s in DECIDING_STATES]),
            )
        )
    ) or 0


async def pending_job(session: AsyncSession, account_id: uuid.UUID, kind: JobKind) -> int | None:
    return await session.scalar(
        select(Job.id).where(
            Job.account_id == account_id, Job.status == "pending", Job.kind == kind.value
        )
    )


async def history(
    session: AsyncSession, account_id: uuid.UUID, *, limit: int = 50
) -> Sequence[DecisionHistoryEntry]:
    """The newest `limit` moves of the decision, oldest first."""
    stmt = (
        select(DecisionHistoryEntry)
        .where(DecisionHistoryEntry.account_id == account_id)
        .order_by(DecisionHistoryEntry.id.desc())
        .limit(limit)
    )
    return list(reversed((await session.execute(stmt)).scalars().all()))
