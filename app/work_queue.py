"""Pending work in Postgres: recorded with a transition, claimed with SKIP LOCKED and a lease."""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import case, cast, literal, text, update
from sqlalchemy.dialects.postgresql import JSONB, Insert
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential

from app.blocked_runs.models import Job
from app.database import Database
from app.notifications import JOBS_CHANNEL, RUN_EVENTS_CHANNEL, notify


class JobKind(StrEnum):
    # The organization's decision (one pending at a time per account; no blocked run named):
    CHECK_PLAN = "check_plan"  # GET /plan, then GET /plan/list or GET /credits
    UPGRADE_PLAN = "upgrade_plan"  # GET /plan, then POST /plan/upgrade unless already paid
    CONFIRM_CHECKOUT = "confirm_checkout"  # GET /plan after the hosted checkout
    SET_TOPUP = "set_topup"  # GET /credits, then POST /credits/settings unless already so
    POLL_CHECKOUT = "poll_checkout"  # GET /plan now and then while a checkout is open
    RELEASE_RUNS = "release_runs"  # move waiting runs after the decision, in bounded batches
    # One blocked run:
    RESUME = "resume"  # POST /agent_run/{id}/resume (GET /agent_run on 409 and on retries)
    VERIFY_RUN = "verify_run"  # GET /agent_run (+ /nodes) before trusting an event
    # Outbound notifications (one per subscription; app/subscriptions):
    DELIVER_NOTIFICATIONS = "deliver_notifications"  # POST signed events, in order per run


# The decision's Mosaic steps; a person's action waits for none of them to be pending.
DECISION_STEPS = frozenset(
    {JobKind.CHECK_PLAN, JobKind.UPGRADE_PLAN, JobKind.CONFIRM_CHECKOUT, JobKind.SET_TOPUP}
)


def organization_key(account_id: uuid.UUID) -> str:
    """The notification payload for a change of an organization's decision."""
    return f"org:{account_id}"


class NotYet(Exception):
    """The step must wait for something else to settle first: try again later, no harm done."""

    def __init__(self, message: str, *, delay: timedelta | None = None) -> None:
        super().__init__(message)
        self.delay = delay


# A step runs in two time boxes, so a slow database after a successful Mosaic call can never
# eat into the time Mosaic was given, or the other way round: the Mosaic part must end within
# MOSAIC_SHARE of the lease (the worker sets that box), and `begin_recording` then gives the
# outcome's transaction the rest, up to RECORDED_BY of the lease (at least RECORDING_SHARE of
# it). Both end inside the lease, so no second worker repeats the calls; if recording runs out
# anyway, the retry reads Mosaic (and the job's notes) before writing anything.
MOSAIC_SHARE = 0.75
RECORDING_SHARE = 0.2
RECORDED_BY = 0.95


@dataclass(frozen=True)
class StepDeadline:
    box: asyncio.Timeout
    started: float  # loop time the step started at


STEP_DEADLINE: ContextVar[StepDeadline | None] = ContextVar("step_deadline", default=None)


def begin_recording(lease: timedelta) -> None:
    """The step's Mosaic calls are over: give recording the outcome its own time box."""
    deadline = STEP_DEADLINE.get()
    if deadline is not None:
        seconds = lease.total_seconds()
        now = asyncio.get_running_loop().time()
        deadline.box.reschedule(
            max(now + seconds * RECORDING_SHARE, deadline.started + seconds * RECORDED_BY)
        )


async def note(db: Database, job: ClaimedJob, **facts: Any) -> None:
    """Keep what Mosaic answered on the job itself, in a transaction of its own, right away.

    An attempt that dies (or times out) before recording its outcome leaves this for the
    next attempt, which then acts on Mosaic's answer instead of asking again: the one way to
    learn a checkout URL twice is to open two checkouts. A database that is briefly away (a
    restart, a failover) is waited for, within the step's time box, for the same reason.
    """
    statement = (
        update(Job)
        .where(Job.id == job.id, Job.locked_by == job.worker_id, Job.status == "pending")
        .values(payload=Job.payload.op("||")(cast(literal(json.dumps(facts)), JSONB)))
    )
    async for attempt in AsyncRetrying(
        retry=retry_if_exception_type((DBAPIError, OSError)),
        wait=wait_exponential(multiplier=0.1, max=1.0),
        reraise=True,
    ):
        with attempt:
            async with db.transaction() as session:
                await session.execute(statement)


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


async def enqueue_decision_job(
    session: AsyncSession,
    kind: JobKind,
    *,
    account_id: uuid.UUID,
    give_up_after: timedelta,
    payload: dict[str, Any] | None = None,
    hold_for: timedelta | None = None,
    delay: timedelta | None = None,
) -> int | None:
    """Record work on an organization's decision; None if one of its kind is pending already.

    Unique indexes allow one pending Mosaic step, one release and one checkout poll per
    organization, so this is the guard against a second purchase under way, not a convention.
    """
    hold = hold_for or delay or timedelta(0)
    stmt = _new_job(
        kind,
        account_id=account_id,
        give_up_after=give_up_after,
        blocked_run_id=None,
        payload=payload or {},
        hold=hold,
    ).on_conflict_do_nothing()
    job_id: int | None = (await session.execute(stmt.returning(Job.id))).scalar_one_or_none()
    if job_id is not None and not hold:
        await notify(session, JOBS_CHANNEL)
    return job_id


async def enqueue_verification(
    session: AsyncSession,
    *,
    account_id: uuid.UUID,
    run_id: str,
    agent_id: str | None,
    give_up_after: timedelta,
    hold_for: timedelta | None = None,
) -> int:
    """Ask Mosaic about a run; returns the verification job.

    Copies share one pending verification. A request that arrives while that one is already in
    flight bumps its `requests` count: the in-flight attempt saw Mosaic before this news, so it
    does not close the job but runs again (see `finish`), and nothing asked for is lost.
    """
    stmt = _new_job(
        JobKind.VERIFY_RUN,
        account_id=account_id,
        give_up_after=give_up_after,
        blocked_run_id=None,
        payload={"run_id": run_id, "agent_id": agent_id, "requests": 1},
        hold=hold_for or timedelta(0),
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=[Job.account_id, text("(payload->>'run_id')")],
        index_where=text("kind = 'verify_run' AND status = 'pending'"),
        set_={
            "payload": text(
                "jsonb_set(jobs.payload, '{requests}', "
                "to_jsonb(COALESCE((jobs.payload->>'requests')::int, 1) + 1))"
            )
        },
    )
    job_id: int = (await session.execute(stmt.returning(Job.id))).scalar_one()
    if not hold_for:
        await notify(session, JOBS_CHANNEL)
    return job_id


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


async def finish(session: AsyncSession, job: ClaimedJob, *, status: str = "done") -> bool:
    """Close the job in the transaction that records its outcome; refuses a lost lease.

    False (and the job stays pending, due now) when the job was asked for again while this
    attempt ran (`requests` grew): the caller's reading of Mosaic may predate that news.
    """
    seen = job.payload.get("requests")
    ours = (Job.id == job.id, Job.locked_by == job.worker_id, Job.status == "pending")
    again = text(
        "COALESCE(jobs.payload->'requests', 'null'::jsonb) <> CAST(:seen AS jsonb)"
    ).bindparams(seen=json.dumps(seen))
    done = await session.execute(
        update(Job)
        .where(*ours)
        .values(
            status=case((again, "pending"), else_=status),
            finished_at=case((again, None), else_=text("now()")),
            run_after=case((again, text("now()")), else_=Job.run_after),
            locked_by=case((again, None), else_=Job.locked_by),
            locked_until=None,
        )
        .returning(Job.status)
    )
    outcome = done.scalar_one_or_none()
    if outcome is None:
        raise LeaseLost(f"job {job.id} is no longer ours")
    if job.blocked_run_id is not None:
        await notify(session, RUN_EVENTS_CHANNEL, str(job.blocked_run_id))
    elif job.kind in DECISION_STEPS:
        await notify(session, RUN_EVENTS_CHANNEL, organization_key(job.account_id))
    if outcome == "pending":
        await notify(session, JOBS_CHANNEL)
        return False
    return True


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
