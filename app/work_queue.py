"""Pending work in Postgres: recorded with a transition, claimed with SKIP LOCKED and a lease."""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Generic, TypeVar

import asyncpg
from sqlalchemy import case, cast, literal, text, update
from sqlalchemy.dialects.postgresql import JSONB, Insert
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential

from app.batching import Coalescer
from app.blocked_runs.models import Job
from app.database import Database, compile_named
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
    # Claimed with a resume window (`claim_due`), a resume carries what its step reads first.
    run_id: str | None = None
    earlier_resumes: int | None = None


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


# Claims take several due jobs in one statement (SKIP LOCKED, each with a lease). A resume also
# gets what its step needs to read first, in the same round trip: the Mosaic run id and how
# many earlier episodes of that run ended resumed within the resume window since a person last
# retried it (the resume-loop bound; the same count as `blocked_runs.repository.recent_resumes`).
#
# The due jobs are picked in a MATERIALIZED CTE, evaluated once. Written as
# `UPDATE … WHERE id IN (SELECT … LIMIT n FOR UPDATE SKIP LOCKED)`, the planner may rescan the
# subquery once per row (a nested-loop semi join, chosen on a young table's estimates); each
# rescan skips the rows this statement has just updated and locks the next n, so one claim
# took every due job (thousands during a large release) and ran them all at once.
#
# The earlier episodes are found by the run alone (`WHERE account_id, run_id`, its index) and
# filtered by state in the count: with `state = 'resumed'` in the WHERE clause, the planner
# took the (state, state_changed_at) index on statistics from before a release and walked every
# resumed run of every account once per claimed job, which made a 10,000-run release slower
# with each run it resumed.
_CLAIM = """
WITH picked AS MATERIALIZED (
    SELECT id FROM jobs
    WHERE status = 'pending' AND (locked_until IS NULL OR locked_until < now())
      AND {condition}
    ORDER BY run_after, id
    LIMIT $3
    FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE jobs SET locked_until = now() + make_interval(secs => $1::float8), locked_by = $2,
                    attempts = attempts + 1
    FROM picked
    WHERE jobs.id = picked.id
    RETURNING jobs.id, jobs.kind, jobs.account_id, jobs.blocked_run_id, jobs.payload,
              jobs.attempts, jobs.give_up_at
)
SELECT c.id, c.kind, c.account_id, c.blocked_run_id, c.payload, c.attempts, c.give_up_at,
       r.run_id AS mosaic_run_id, e.earlier
FROM claimed AS c
LEFT JOIN blocked_runs AS r ON r.id = c.blocked_run_id AND c.kind = 'resume'
LEFT JOIN LATERAL (
    SELECT count(*) FILTER (
        WHERE o.state = 'resumed' AND o.state_changed_at > greatest(
            now() - make_interval(secs => $4::float8),
            COALESCE((SELECT max(h.created_at) FROM blocked_run_history AS h
                      JOIN blocked_runs AS x ON x.id = h.blocked_run_id
                      WHERE x.account_id = r.account_id AND x.run_id = r.run_id
                        AND h.event = 'retry'), '-infinity'::timestamptz))
    ) AS earlier
    FROM blocked_runs AS o
    WHERE o.account_id = r.account_id AND o.run_id = r.run_id
) AS e ON r.id IS NOT NULL AND $4::float8 IS NOT NULL
ORDER BY c.id
"""
_CLAIM_DUE = _CLAIM.format(condition="run_after <= now()")
_CLAIM_ONE = _CLAIM.format(condition="id = $5")


async def _claim(
    db: Database,
    statement: str,
    args: tuple[Any, ...],
    worker_id: str,
    lease: timedelta,
    limit: int,
    resume_window: timedelta | None,
) -> list[ClaimedJob]:
    window = resume_window.total_seconds() if resume_window is not None else None
    # One statement, its own transaction: no BEGIN/COMMIT round trips around it.
    pool = await db.driver_pool()
    rows = await pool.fetch(statement, lease.total_seconds(), worker_id, limit, window, *args)
    return [
        ClaimedJob(
            id=r["id"],
            kind=JobKind(r["kind"]),
            account_id=r["account_id"],
            blocked_run_id=r["blocked_run_id"],
            payload=r["payload"],
            attempts=r["attempts"],
            give_up_at=r["give_up_at"],
            worker_id=worker_id,
            run_id=r["mosaic_run_id"],
            earlier_resumes=r["earlier"],
        )
        for r in rows
    ]


async def claim_due(
    db: Database,
    worker_id: str,
    *,
    limit: int,
    lease: timedelta,
    resume_window: timedelta | None = None,
) -> list[ClaimedJob]:
    """Claim up to `limit` due jobs in one statement. With `resume_window`, a resume comes with
    its run's Mosaic id and earlier resume count (`ClaimedJob.run_id`, `.earlier_resumes`)."""
    return await _claim(db, _CLAIM_DUE, (), worker_id, lease, limit, resume_window)


async def claim_job(
    db: Database,
    job_id: int,
    worker_id: str,
    lease: timedelta,
    *,
    resume_window: timedelta | None = None,
) -> ClaimedJob | None:
    """Claim one job now, due or held (used by the request that recorded it)."""
    jobs = await _claim(db, _CLAIM_ONE, (job_id,), worker_id, lease, 1, resume_window)
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


# `finish` as plain SQL for steps recorded on a plain asyncpg connection (`Database.raw()`), with
# named binds :job_id, :worker and :seen (the job's `requests` as the attempt saw it, as jsonb
# text): the same checks and the same outcome, usable alone or as a CTE of a statement that
# records the step's outcome only if this closed the job (`also`: a further SQL condition, such
# as the decision's lock having been taken first in that statement).
def finish_update_sql(also: str = "") -> str:
    again = "COALESCE(payload->'requests', 'null'::jsonb) <> CAST(CAST(:seen AS text) AS jsonb)"
    return f"""
UPDATE jobs SET
    status = CASE WHEN {again} THEN 'pending' ELSE 'done' END,
    finished_at = CASE WHEN {again} THEN NULL ELSE now() END,
    run_after = CASE WHEN {again} THEN now() ELSE run_after END,
    locked_by = CASE WHEN {again} THEN NULL ELSE locked_by END,
    locked_until = NULL
WHERE id = CAST(:job_id AS bigint) AND locked_by = CAST(:worker AS text) AND status = 'pending'
  {also}
RETURNING status
"""


def finish_binds(job: ClaimedJob) -> dict[str, Any]:
    return {
        "job_id": job.id,
        "worker": job.worker_id,
        "seen": json.dumps(job.payload.get("requests")),
    }


_FINISH_ALONE = compile_named(finish_update_sql())


async def finish_on(conn: asyncpg.Connection, job: ClaimedJob) -> bool:
    """`finish` on a plain asyncpg connection, in the caller's transaction, with its NOTIFYs."""
    outcome = await conn.fetchval(_FINISH_ALONE.sql, *_FINISH_ALONE.args(finish_binds(job)))
    closed = finished(job, outcome)
    await conn.execute(
        "SELECT pg_notify($1, $2) WHERE $2 IS NOT NULL UNION ALL SELECT pg_notify($3, '') WHERE $4",
        RUN_EVENTS_CHANNEL,
        finish_key(job),
        JOBS_CHANNEL,
        not closed,
    )
    return closed


def finished(job: ClaimedJob, outcome: str | None) -> bool:
    """Whether a finish closed the job (False: asked for again, due now); LeaseLost if it found
    the job no longer ours."""
    if outcome is None:
        raise LeaseLost(f"job {job.id} is no longer ours")
    return outcome != "pending"


def finish_key(job: ClaimedJob) -> str | None:
    """What a finished job announces on the run-events channel, as `finish` does."""
    if job.blocked_run_id is not None:
        return str(job.blocked_run_id)
    return organization_key(job.account_id) if job.kind in DECISION_STEPS else None


async def reschedule(db: Database, job: ClaimedJob, *, delay: timedelta, error: str) -> None:
    async with db.raw() as conn:
        await conn.execute(
            "UPDATE jobs SET run_after = now() + make_interval(secs => $1::float8),"
            " locked_until = NULL, locked_by = NULL, last_error = $2"
            " WHERE id = $3 AND locked_by = $4 AND status = 'pending'",
            delay.total_seconds(),
            error[:1000],
            job.id,
            job.worker_id,
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


T = TypeVar("T")

# Set in the worker loop: its steps hand their outcome to a group commit without waiting for it
# (`GroupCommit.submit`). A request's immediate attempt (`worker.attempt_now`) waits, so the
# person's answer shows the outcome.
detached_recording: ContextVar[bool] = ContextVar("detached_recording", default=False)


class GroupCommit(Generic[T]):
    """Record many steps' outcomes in one transaction: a group commit.

    Each step calls Mosaic on its own, then hands its outcome here and waits until it is
    committed. The first outcome is written at once; those arriving while a write is under way
    wait for it and go together in the next one, so under load one set-based transaction
    records a whole batch, and alone a step waits for nobody. `flush` gets a batch (at most
    `limit`) and answers which of its jobs it closed; a job it did not close (lease lost,
    cancelled meanwhile) raises LeaseLost in its own step, and a failed write raises its error
    in every step of that batch, each then retried on its own like any failed step.

    A step whose time box ends while it waits stops waiting; its outcome may still commit
    (then the job is closed and its reschedule finds nothing to do) or not (then its retry
    reads Mosaic first), never half.

    The worker's own steps do not wait (`submit`, see `detached_recording`): a step frees its
    slot once Mosaic has answered, so the next claims call Mosaic while the outcomes commit, and
    a batch can hold more outcomes than there are slots. An outcome that then fails to commit
    (its connection lost, the process killed) leaves its job leased: when the lease runs out the
    job is claimed again, and a retried step reads Mosaic before any write.
    """

    def __init__(self, flush: Callable[[list[T]], Awaitable[set[int]]], *, limit: int) -> None:
        self._flush = flush
        self._batches: Coalescer[tuple[int, T], None] = Coalescer(self._commit, limit=limit)

    async def record(self, job_id: int, outcome: T) -> None:
        """Hand an outcome over and wait until it is committed (LeaseLost if not ours)."""
        await self.submit(job_id, outcome)

    def submit(self, job_id: int, outcome: T) -> asyncio.Future[None]:
        """Hand an outcome over; the future ends when it is committed (or refused, or failed)."""
        return self._batches.submit((job_id, outcome))

    async def drain(self) -> None:
        """Wait for the outcomes handed over so far to be written (bound it with a timeout)."""
        await self._batches.drain()

    async def _commit(self, batch: list[tuple[int, T]]) -> list[Exception | None]:
        closed = await self._flush([outcome for _, outcome in batch])
        return [
            None if job_id in closed else LeaseLost(f"job {job_id} is no longer ours")
            for job_id, _ in batch
        ]
