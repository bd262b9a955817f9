"""The worker: claims due work, runs the step, retries with backoff, gives up into `failed`.

Several replicas may run it; `FOR UPDATE SKIP LOCKED` plus a lease keeps each job with one
worker at a time, and a job whose worker died is taken again when its lease runs out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from sqlalchemy import select

from app import log as log_context
from app import maintenance, metrics
from app.blocked_runs import repository
from app.blocked_runs.models import BlockedRun
from app.blocked_runs.state_machine import ACTIVE_STATES, Event, release, transition
from app.blocked_runs.steps import HANDLERS as RUN_STEPS
from app.blocked_runs.steps import recorder as resume_recorder
from app.mosaic import MosaicError
from app.notifications import JOBS_CHANNEL, RUN_EVENTS_CHANNEL, next_change_of
from app.organizations import repository as organizations_repository
from app.organizations.service import decide
from app.organizations.state_machine import OPEN_STATES
from app.organizations.steps import HANDLERS as DECISION_STEPS
from app.runtime import Runtime
from app.startup import wait_for_schema
from app.subscriptions import delivery as notifications_out
from app.webhooks.service import verify_run
from app.work_queue import (
    DECISION_STEPS as DECISION_STEP_KINDS,
)
from app.work_queue import (
    MOSAIC_SHARE,
    STEP_DEADLINE,
    ClaimedJob,
    JobKind,
    LeaseLost,
    NotYet,
    StepDeadline,
    backoff,
    claim_due,
    claim_job,
    detached_recording,
    finish,
    organization_key,
    reschedule,
)

log = logging.getLogger(__name__)
# Steps whose Mosaic call spends money or changes settings.
WRITES = frozenset({JobKind.UPGRADE_PLAN, JobKind.SET_TOPUP})

Step = Callable[[Runtime, ClaimedJob], Awaitable[None]]
STEPS: dict[JobKind, Step] = {
    **DECISION_STEPS,
    **RUN_STEPS,
    JobKind.VERIFY_RUN: verify_run,
    JobKind.DELIVER_NOTIFICATIONS: notifications_out.deliver,
}


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


async def execute(rt: Runtime, job: ClaimedJob) -> None:
    """Run one claimed job to an outcome: done, rescheduled, or given up."""
    log_context.bind(job_id=job.id, step=job.kind.value, account_id=str(job.account_id))
    log_context.bind(blocked_run_id=str(job.blocked_run_id) if job.blocked_run_id else None)
    try:
        # A step must end well inside its lease, or another worker could repeat its calls:
        # its Mosaic part gets MOSAIC_SHARE of the lease, and recording the outcome gets its
        # own box (see work_queue.begin_recording).
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(rt.settings.job_lease.total_seconds() * MOSAIC_SHARE) as box:
            token = STEP_DEADLINE.set(StepDeadline(box, loop.time()))
            try:
                await STEPS[job.kind](rt, job)
            finally:
                STEP_DEADLINE.reset(token)
        metrics.JOBS.labels(job.kind, "done").inc()
    except LeaseLost:
        metrics.JOBS.labels(job.kind, "lease_lost").inc()
        log.info("job %s (%s): lease lost or cancelled; outcome dropped", job.id, job.kind)
    except NotYet as wait:
        if wait.delay is not None:
            await reschedule(rt.db, job, delay=wait.delay, error=f"waiting: {wait}")
        else:
            await _retry_later(rt, job, f"waiting: {wait}", None)
    except MosaicError as exc:
        if exc.transient and datetime.now(UTC) < job.give_up_at:
            await _retry_later(rt, job, str(exc), exc.retry_after)
        else:
            code = "mosaic_unavailable" if exc.transient else "mosaic_rejected"
            await give_up(rt, job, code, str(exc))
    except TimeoutError:
        # A write cut off mid-call may still land at Mosaic: like a lost answer, its retry
        # waits for that first, then reads before writing (organizations/steps.py).
        settle = 2 * rt.settings.mosaic_timeout.total_seconds() if job.kind in WRITES else None
        if datetime.now(UTC) < job.give_up_at:
            await _retry_later(rt, job, "the step took too long", settle)
        else:
            await give_up(rt, job, "mosaic_unavailable", "Mosaic kept answering too slowly.")
    except Exception as exc:
        # The details go to the log (and jobs.last_error), never to the person reading the run.
        log.exception("job %s (%s) failed unexpectedly", job.id, job.kind)
        if datetime.now(UTC) < job.give_up_at:
            await _retry_later(rt, job, f"{type(exc).__name__}: {exc}", None)
        else:
            await give_up(rt, job, "internal_error", "an internal error; operators have the log")


async def _retry_later(rt: Runtime, job: ClaimedJob, error: str, retry_after: float | None) -> None:
    settings = rt.settings
    delay = backoff(
        job.attempts, base=settings.retry_base, cap=settings.retry_max, retry_after=retry_after
    )
    metrics.JOBS.labels(job.kind, "retry").inc()
    log.warning(
        "job %s (%s) attempt %s: %s; retrying in %.1fs",
        job.id,
        job.kind,
        job.attempts,
        error,
        delay.total_seconds(),
    )
    await reschedule(rt.db, job, delay=delay, error=error)


async def give_up(rt: Runtime, job: ClaimedJob, code: str, message: str) -> None:
    """Stop retrying: the job fails, and so does what it was for, with the reason shown to a
    person (a decision's step: the decision, and so every run waiting on it)."""
    metrics.JOBS.labels(job.kind, "gave_up").inc()
    log.error("job %s (%s) gave up: %s", job.id, job.kind, message)
    error_message = f"Could not complete {job.kind.replace('_', ' ')}: {message}"
    try:
        async with rt.db.transaction() as session:
            if job.kind in DECISION_STEP_KINDS:
                decision = await organizations_repository.lock(session, job.account_id)
                await finish(session, job, status="failed")
                reason = f"{job.kind} gave up: {message}"
                if decision.state in OPEN_STATES:
                    await decide(
                        rt,
                        session,
                        decision,
                        Event.GIVE_UP,
                        actor="system",
                        reason=reason,
                        error_code=code,
                        error_message=error_message,
                    )
                else:  # a check that never opened its round: its runs wait in checking_plan
                    await release(
                        session,
                        job.account_id,
                        Event.GIVE_UP,
                        actor="system",
                        reason=reason,
                        limit=2**31 - 1,
                        give_up_after_seconds=0,
                        error_code=code,
                        error_message=error_message,
                    )
                return
            # The run before the job, as everywhere else (cancel locks them in that order).
            run = await repository.lock(session, job.blocked_run_id) if job.blocked_run_id else None
            await finish(session, job, status="failed")
            if run is not None and run.state in ACTIVE_STATES:
                await transition(
                    session,
                    run,
                    Event.GIVE_UP,
                    actor="system",
                    reason=f"{job.kind} gave up: {message}",
                    error_code=code,
                    error_message=error_message,
                )
    except LeaseLost:
        log.info("job %s: lease lost while giving up", job.id)


async def attempt_now(
    rt: Runtime,
    job_id: int | None,
    *,
    account_id: uuid.UUID,
    blocked_run_id: uuid.UUID | None = None,
) -> None:
    """Try a person's job at once, then wait (within the action deadline) for follow-up steps:
    until the run (or, without one, the organization's decision) has no step under way.

    The attempt is shielded: if the deadline passes, it carries on in the background and the
    caller answers 202; a crash meanwhile leaves the job for a worker once its hold ends.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + rt.settings.action_deadline.total_seconds()
    keys = [organization_key(account_id)]
    if blocked_run_id is not None:
        keys.append(str(blocked_run_id))
    async with rt.listener.subscribe(RUN_EVENTS_CHANNEL) as changes:
        job = None
        if job_id is not None:
            job = await claim_job(
                rt.db,
                job_id,
                new_worker_id(),
                rt.settings.job_lease,
                resume_window=rt.settings.resume_window,
            )
        if job is not None:
            task = asyncio.create_task(execute(rt, job))
            rt.keep(task)
            try:
                await asyncio.wait_for(asyncio.shield(task), deadline - loop.time())
            except TimeoutError:
                return
        while (remaining := deadline - loop.time()) > 0:
            if not await _step_under_way(rt, account_id, blocked_run_id):
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(next_change_of(changes, *keys), remaining)


async def _step_under_way(
    rt: Runtime, account_id: uuid.UUID, blocked_run_id: uuid.UUID | None
) -> bool:
    async with rt.db.sessions() as session:
        if blocked_run_id is not None:
            return bool(
                await session.scalar(
                    select(BlockedRun.pending).where(BlockedRun.id == blocked_run_id)
                )
            )
        return await organizations_repository.pending_step(session, account_id) is not None


class Worker:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.worker_id = new_worker_id()
        self._running: set[asyncio.Task[None]] = set()
        self._freed = asyncio.Event()  # set when a running step ends
        self._relay = notifications_out.Relay(rt)

    async def run(self, stop: asyncio.Event) -> None:
        settings = self.rt.settings
        if not await wait_for_schema(self.rt.db, stop):
            return
        log.info("worker %s started", self.worker_id)
        upkeep = asyncio.create_task(maintenance.run(self.rt, stop), name="maintenance")
        async with self.rt.listener.subscribe(JOBS_CHANNEL) as wake:
            while not stop.is_set():
                try:
                    # New outbound notifications get their subscription's drain job here,
                    # outside the transitions that recorded them.
                    await self._relay.run()
                    self._freed.clear()  # a step ending from here on wakes `_idle`
                    free = settings.worker_concurrency - len(self._running)
                    claimed = []
                    if free > 0:
                        # Every free slot in one statement; under load slots free up in batches
                        # (outcomes are recorded together), so claims come in batches too.
                        claimed = await claim_due(
                            self.rt.db,
                            self.worker_id,
                            limit=free,
                            lease=settings.job_lease,
                            resume_window=settings.resume_window,
                        )
                    for job in claimed:
                        task = asyncio.create_task(self._step(job), name=f"job-{job.id}")
                        self._running.add(task)
                        task.add_done_callback(self._slot_freed)
                    if claimed and len(claimed) == free:
                        continue
                except Exception:
                    log.exception("worker loop error; backing off")
                await self._idle(wake, stop, settings.poll_interval.total_seconds())
        if self._running:
            await asyncio.wait(self._running, timeout=settings.job_lease.total_seconds())
        # Outcomes handed over and not yet written; one left behind is retried after its lease.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(settings.job_lease.total_seconds()):
                await resume_recorder(self.rt).drain()
        await upkeep
        log.info("worker %s stopped", self.worker_id)

    async def _step(self, job: ClaimedJob) -> None:
        # This loop's steps free their slot once Mosaic has answered: a resume's outcome is
        # the group commit's to write (work_queue.GroupCommit, `detached_recording`).
        detached_recording.set(True)  # in this step's own task context only
        await execute(self.rt, job)

    def _slot_freed(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._freed.set()

    async def _idle(self, wake: asyncio.Queue[str], stop: asyncio.Event, poll: float) -> None:
        """Sleep until new work is announced, a slot frees up, stop is asked, or the poll tick."""
        waiters = {asyncio.create_task(wake.get()), asyncio.create_task(stop.wait())}
        if self._running:
            waiters.add(asyncio.create_task(self._freed.wait()))
        try:
            await asyncio.wait(waiters, timeout=poll, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        while not wake.empty():
            wake.get_nowait()
