"""What operators look at across accounts: runs (stuck ones too) and a run's current step.

Read-only queries for `unblock runs list|show`; every action an operator takes goes through
the same service functions as the API (`app.blocked_runs.service`, `app.subscriptions.service`).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import and_, exists, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.blocked_runs.models import BlockedRun, HistoryEntry, Job
from app.blocked_runs.state_machine import ACTIVE_STATES, DECIDING_STATES, State
from app.errors import NotFound
from app.work_queue import DECISION_STEPS


def _step_of_run() -> Any:
    """The run's own pending step, or (while it waits on the decision) the decision's."""
    return or_(
        Job.blocked_run_id == BlockedRun.id,
        and_(
            BlockedRun.state.in_([s.value for s in DECIDING_STATES]),
            Job.blocked_run_id.is_(None),
            Job.account_id == BlockedRun.account_id,
            Job.kind.in_([k.value for k in DECISION_STEPS]),
        ),
    )


async def runs(
    session: AsyncSession,
    *,
    account_id: uuid.UUID | None,
    states: Sequence[State],
    stuck_after: timedelta | None,
    limit: int,
) -> Sequence[BlockedRun]:
    """Runs newest first. With `stuck_after`: open runs unchanged for that long, or whose
    current step has failed at least once (it is being retried)."""
    stmt = select(BlockedRun)
    if account_id is not None:
        stmt = stmt.where(BlockedRun.account_id == account_id)
    if states:
        stmt = stmt.where(BlockedRun.state.in_([s.value for s in states]))
    if stuck_after is not None:
        failing_step = exists(
            select(Job.id).where(
                _step_of_run(), Job.status == "pending", Job.last_error.is_not(None)
            )
        )
        stmt = stmt.where(
            BlockedRun.state.in_([s.value for s in ACTIVE_STATES]),
            or_(BlockedRun.state_changed_at < func.now() - stuck_after, failing_step),
        )
    stmt = stmt.order_by(BlockedRun.created_at.desc(), BlockedRun.id.desc()).limit(limit)
    return (await session.scalars(stmt)).all()


async def run(session: AsyncSession, blocked_run_id: uuid.UUID) -> BlockedRun:
    found = await session.get(BlockedRun, blocked_run_id)
    if found is None:
        raise NotFound("No such blocked run.", code="blocked_run_not_found")
    return found


async def history(session: AsyncSession, blocked_run_id: uuid.UUID) -> Sequence[HistoryEntry]:
    stmt = select(HistoryEntry).where(HistoryEntry.blocked_run_id == blocked_run_id)
    return (await session.scalars(stmt.order_by(HistoryEntry.id))).all()


async def current_step(session: AsyncSession, run_: BlockedRun) -> Job | None:
    """The step the run waits on now (its own, or its decision's), with its last error."""
    mine = [Job.blocked_run_id == run_.id]
    if State(run_.state) in DECIDING_STATES:
        mine.append(
            and_(
                Job.blocked_run_id.is_(None),
                Job.account_id == run_.account_id,
                Job.kind.in_([k.value for k in DECISION_STEPS]),
            )
        )
    stmt = select(Job).where(Job.status == "pending", or_(*mine)).order_by(Job.id).limit(1)
    return await session.scalar(stmt)


async def last_step(session: AsyncSession, run_: BlockedRun) -> Job | None:
    """The run's most recent step that recorded an error (when none is pending)."""
    stmt = (
        select(Job)
        .where(Job.blocked_run_id == run_.id, Job.last_error.is_not(None))
        .order_by(Job.id.desc())
        .limit(1)
    )
    return await session.scalar(stmt)
