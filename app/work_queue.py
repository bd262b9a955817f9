"""Pending work in Postgres: recorded with a transition, claimed with SKIP LOCKED and a lease."""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import text, update
from sqlalchemy.dialects.postgresql import Insert
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from app.blocked_runs.models import Job
from app.database import Database
from app.notifications import JOBS_CHANNEL, RUN_EVENTS_CHANNEL, notify


class JobKind(StrEnum):
    CHECK_PLAN = "check_plan"  # GET /plan, then GET /plan/list or GET /credits
    UPGRADE_PLAN = "upgrade_plan"  # POST /plan/upgrade
    CONFIRM_CHECKOUT = "confirm_checkout"  # GET /plan after the hosted checkout
    SET_TOPUP = "set_topup"  # POST /credits/settings
    RESUME = "resume"  # POST /agent_run/{id}/resume (GET /agent_run on 409)
    VERIFY_RUN = "verify_run"  # GET /agent_run (+ /nodes) for a failure without the flag


class NotYet(Exception):
    """The step must wait for something else to settle first: try again later, no harm done."""


class LeaseLost(Exception):
    """Another worker owns the job now, or it was cancelled: drop this attempt's outcome."""


@dataclass(frozen=True)
class ClaimedJob:
    id: int
    kind: JobKind
    account_id: uuid.UUID
    blocked_run_id: uuid.UUID | None
    payload: dict[str, Any]
    attempts: int
    give_up_at: datetime
    worker_id: str


def _new_job(
    kind: JobKind,
    *,
    account_id: uuid.UUID,
    give_up_after: timedelta,
    blocked_run_id: uuid.UUID | None,
    payload: dict[str, Any],
    hold: timedelta,
) -> Insert:
    return pg_insert(Job).values(
        kind=kind.value,
        account_id=account_id,
        blocked_run_id=blocked_run_id,
        payload=payload,
        run_after=text("now() + make_interval(secs => :hold)").bindparams(
            hold=hold.total_seconds()
        ),
        give_up_at=text("now() + make_interval(secs => :give_up)").bindparams(
            give_up=give_up_after.total_seconds()
        ),
    )


async def enqueue(
    session: AsyncSession,
    kind: JobKind,
    *,
    account_id: uuid.UUID,
    give_up_after: timedelta,
    blocked_run_id: uuid.UUID | None = None,
    payload: dict[str, Any] | None = None,
    hold_for: timedelta | None = None,
) -> int:
    """Record work in the caller's transaction.

    `hold_for` keeps workers off the job while the request that made it tries it at once; if
    that request dies, a worker takes the job when the hold ends.
    """
    hold = hold_for or timedelta(0)
    stmt = _new_job(
        kind,
        account_id=account_id,
        give_up_after=give_up_after,
        blocked_run_id=blocked_run_id,
        payload=payload or {},
        hold=hold,
    )
    job_id: int = (await session.execute(stmt.returning(Job.id))).scalar_one()
    if not hold:
        await notify(session, JOBS_CHANNEL)
    return job_id


async def enqueue_verification(
    session: AsyncSession,
    *,
    account_id: uuid.UUID,
    run_id: str,
    agent_id: str | None,
    give_up_after: timedelta,
) -> None:
    """Ask Mosaic about a run, unless a verification of it is pending already."""
    stmt = _new_job(
        JobKind.VERIFY_RUN,
        account_id=account_id,
        give_up_after=give_up_after,
        blocked_run_id=None,
        payload={"run_id": run_id, "agent_id": agent_id},
        hold=timedelta(0),
    ).on_conflict_do_nothing(
        index_elements=[Job.account_id, text("(payload->>'run_id')")],
        index_where=text("kind = 'verify_run' AND status = 'pending'"),
    )
    if (await session.execute(stmt.returning(Job.id))).scalar_one_or_none() is not None:
        await notify(session, JOBS_CHANNEL)


_CLAIM = """
UPDATE jobs SET locked_until = now() + make_interval(secs => :lease), locked_by = :worker,
                attempts = attempts + 1
WHERE id IN (
    SELECT id FROM jobs
    WHERE status = 'pending' AND (locked_until IS NULL OR locked_until < now()) AND {condition}
    ORDER BY run_after, id
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
)
RETURNING id, kind, account_id, blocked_run_id, payload, attempts, give_up_at
"""


async def _claim(
    db: Database, condition: str, params: dict[str, Any], worker_id: str, lease: timedelta
) -> list[ClaimedJob]:
    async with db.transaction() as session:
        rows = await session.execute(
            text(_CLAIM.format(condition=condition)),
            {"lease": lease.total_seconds(), "worker": worker_id, **params},
        )
        return [
            ClaimedJob(
                id=r.id,
                kind=JobKind(r.kind),
                account_id=r.account_id,
                blocked_run_id=r.blocked_run_id,
                payload=r.payload,
                attempts=r.attempts,
                give_up_at=r.give_up_at,
                worker_id=worker_id,
            )
            for r in rows
        ]


async def claim_due(
    db: Database, worker_id: str, *, limit: int, lease: timedelta
) -> list[ClaimedJob]:
    return await _claim(db, "run_after <= now()", {"limit": limit}, worker_id, lease)


async def claim_job(
    db: Database, job_id: int, worker_id: str, lease: timedelta
) -> ClaimedJob | None:
    """Claim one job now, due or held (used by the request that recorded it)."""
    jobs = await _claim(db, "id = :job_id", {"limit": 1, "job_id": job_id}, worker_id, lease)
    return jobs[0] if jobs else None


async def finish(session: AsyncSession, job: ClaimedJob, *, status: str = "done") -> None:
    """Close the job in the transaction that records its outcome; refuses a lost lease."""
    done = await session.execute(
        update(Job)
        .where(Job.id == job.id, Job.locked_by == job.worker_id, Job.status == "pending")
        .values(status=status, finished_at=text("now()"), locked_until=None)
        .returning(Job.id)
    )
    if done.scalar_one_or_none() is None:
        raise LeaseLost(f"job {job.id} is no longer ours")
    if job.blocked_run_id is not None:
        await notify(session, RUN_EVENTS_CHANNEL, str(job.blocked_run_id))


async def reschedule(db: Database, job: ClaimedJob, *, delay: timedelta, error: str) -> None:
    async with db.transaction() as session:
        await session.execute(
            update(Job)
            .where(Job.id == job.id, Job.locked_by == job.worker_id, Job.status == "pending")
            .values(
                run_after=text("now() + make_interval(secs => :delay)").bindparams(
                    delay=delay.total_seconds()
                ),
                locked_until=None,
                locked_by=None,
                last_error=error[:1000],
            )
        )


async def cancel_pending(session: AsyncSession, blocked_run_id: uuid.UUID) -> None:
    """Drop a run's pending work (cancelled, expired); an in-flight attempt loses its lease."""
    await session.execute(
        update(Job)
        .where(Job.blocked_run_id == blocked_run_id, Job.status == "pending")
        .values(status="cancelled", finished_at=text("now()"), locked_until=None)
    )


def backoff(
    attempts: int, *, base: timedelta, cap: timedelta, retry_after: float | None
) -> timedelta:
    """Exponential backoff with full jitter, never sooner than Mosaic's Retry-After."""
    # Full jitter: uniform up to base * 2^(n-1), capped; the exponent is bounded against overflow.
    ceiling = min(cap.total_seconds(), base.total_seconds() * 2 ** min(max(1, attempts) - 1, 60))
    return timedelta(seconds=max(random.uniform(0, ceiling), retry_after or 0.0))
