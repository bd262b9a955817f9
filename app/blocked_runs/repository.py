"""Every query on blocked runs; each one scoped to an account where a caller is involved."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Collection, Sequence
from datetime import datetime, timedelta

from sqlalchemy import and_, func, or_, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from app.blocked_runs.models import BlockedRun, HistoryEntry
from app.blocked_runs.state_machine import ACTIVE_STATES, State
from app.errors import InvalidInput, NotFound


async def get_for_account(
    session: AsyncSession, account_id: uuid.UUID, blocked_run_id: uuid.UUID, *, lock: bool = False
) -> BlockedRun:
    """The caller's run, or 404 (another account's id is indistinguishable from an unknown one)."""
    stmt = select(BlockedRun).where(
        BlockedRun.id == blocked_run_id, BlockedRun.account_id == account_id
    )
    if lock:
        stmt = stmt.with_for_update(of=BlockedRun, key_share=True)
    run = (await session.execute(stmt)).scalar_one_or_none()
    if run is None:
        raise NotFound("No such blocked run.", code="blocked_run_not_found")
    if lock:
        await _reread_pending(session, run)
    return run


async def _reread_pending(session: AsyncSession, run: BlockedRun) -> None:
    # A FOR UPDATE that waited re-checks the locked row, but `pending` is a subquery read with
    # the statement's older snapshot; read it again now that the lock is ours.
    await session.refresh(run, ["pending"])


async def lock(session: AsyncSession, blocked_run_id: uuid.UUID) -> BlockedRun:
    """Row-lock a run for a system step (the job already names the account)."""
    stmt = (
        select(BlockedRun)
        .where(BlockedRun.id == blocked_run_id)
        .with_for_update(of=BlockedRun, key_share=True)
    )
    run = (await session.execute(stmt.execution_options(populate_existing=True))).scalar_one()
    await _reread_pending(session, run)
    return run


async def open_episode_for(
    session: AsyncSession, account_id: uuid.UUID, run_id: str, *, lock: bool = False
) -> BlockedRun | None:
    stmt = select(BlockedRun).where(
        BlockedRun.account_id == account_id,
        BlockedRun.run_id == run_id,
        BlockedRun.state.in_([s.value for s in ACTIVE_STATES]),
    )
    if lock:
        stmt = stmt.with_for_update(of=BlockedRun, key_share=True)
    return (await session.execute(stmt)).scalar_one_or_none()


async def latest_episode(
    session: AsyncSession, account_id: uuid.UUID, run_id: str
) -> BlockedRun | None:
    stmt = (
        select(BlockedRun)
        .where(BlockedRun.account_id == account_id, BlockedRun.run_id == run_id)
        .order_by(BlockedRun.created_at.desc())
        .limit(1)
    )
    return (await session.execute(stmt)).scalar_one_or_none()


async def recent_resumes(
    session: AsyncSession, account_id: uuid.UUID, run_id: str, window: timedelta
) -> int:
    """Earlier episodes of this Mosaic run that ended resumed within `window`, counted since a
    person last retried it (the resume-loop bound: a retry gives the run a fresh allowance)."""
    same_run = (BlockedRun.account_id == account_id, BlockedRun.run_id == run_id)
    last_retry = (
        select(func.max(HistoryEntry.created_at))
        .join(BlockedRun, BlockedRun.id == HistoryEntry.blocked_run_id)
        .where(*same_run, HistoryEntry.event == "retry")
        .scalar_subquery()
    )
    since = func.greatest(
        func.now() - window, func.coalesce(last_retry, text("'-infinity'::timestamptz"))
    )
    # The state is a filter of the count, not of the scan: the run's own episodes are few and
    # come from its index, where a `state` condition could lead the planner to walk every
    # resumed run of every account (see `app.work_queue`'s claim).
    resumed_since = and_(
        BlockedRun.state == State.RESUMED.value, BlockedRun.state_changed_at > since
    )
    return (
        await session.scalar(
            select(func.count().filter(resumed_since)).select_from(BlockedRun).where(*same_run)
        )
    ) or 0


async def resume_generation(session: AsyncSession, account_id: uuid.UUID, run_id: str) -> int:
    """How many times this Mosaic run has entered `resuming` (across all its episodes)."""
    return (
        await session.scalar(
            select(func.count())
            .select_from(HistoryEntry)
            .join(BlockedRun, BlockedRun.id == HistoryEntry.blocked_run_id)
            .where(
                BlockedRun.account_id == account_id,
                BlockedRun.run_id == run_id,
                HistoryEntry.to_state == State.RESUMING.value,
            )
        )
    ) or 0


async def history(session: AsyncSession, blocked_run_id: uuid.UUID) -> Sequence[HistoryEntry]:
    stmt = (
        select(HistoryEntry)
        .where(HistoryEntry.blocked_run_id == blocked_run_id)
        .order_by(HistoryEntry.id)
    )
    return (await session.execute(stmt)).scalars().all()


def encode_cursor(run: BlockedRun) -> str:
    raw = f"{run.created_at.isoformat()}|{run.id}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created, run_id = raw.split("|")
        return datetime.fromisoformat(created), uuid.UUID(run_id)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput(
            "The cursor is not one this API handed out.", code="invalid_cursor"
        ) from exc


async def page(
    session: AsyncSession,
    account_id: uuid.UUID,
    *,
    states: Collection[State],
    run_id: str | None,
    limit: int,
    cursor: str | None,
) -> tuple[Sequence[BlockedRun], str | None]:
    """Newest first, keyset-paginated on (created_at, id)."""
    stmt = select(BlockedRun).where(BlockedRun.account_id == account_id)
    if states:
        stmt = stmt.where(BlockedRun.state.in_([s.value for s in states]))
    if run_id is not None:
        stmt = stmt.where(BlockedRun.run_id == run_id)
    if cursor:
        created, last_id = decode_cursor(cursor)
        stmt = stmt.where(
            or_(
                BlockedRun.created_at < created,
                and_(BlockedRun.created_at == created, BlockedRun.id < last_id),
            )
        )
    stmt = stmt.order_by(BlockedRun.created_at.desc(), BlockedRun.id.desc()).limit(limit + 1)
    rows = (await session.execute(stmt)).scalars().all()
    if len(rows) > limit:
        return rows[:limit], encode_cursor(rows[limit - 1])
    return rows, None
