"""A blocked run's own system step: the resume. The organization's steps (plan, checkout,
top-up) are the decision's, in `app.organizations.steps`.

A step reads what it needs (claimed with its job), calls Mosaic with no transaction open, then
in one transaction locks the run, closes the job (refused if the lease was lost or the run was
cancelled meanwhile), and applies the outcome through the state machine's set-based
`finish_resumes`, together with the outcomes of other resumes finishing at the same time.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from functools import partial
from typing import cast

from app import metrics
from app.blocked_runs import repository
from app.blocked_runs.models import BlockedRun
from app.blocked_runs.state_machine import Event, ResumeOutcome, finish_resumes
from app.mosaic import MosaicError
from app.runtime import Runtime
from app.work_queue import (
    ClaimedJob,
    GroupCommit,
    JobKind,
    LeaseLost,
    begin_recording,
    detached_recording,
)

SYSTEM = "system"
log = logging.getLogger(__name__)


RESUMED_STATUSES = frozenset({"running", "completed"})


# Resume outcomes recorded together: at most this many per transaction.
RESUME_BATCH = 64


async def resume(rt: Runtime, job: ClaimedJob) -> None:
    """POST resume, once; a 409 is answered by re-reading the run (it may run already).

    The worker claims resumes with what this step reads first (the run's Mosaic id and its
    earlier resumes); several resumes call Mosaic side by side, each in its own task and slot,
    and their outcomes are recorded together (`recorder`), one transaction per batch.
    """
    run_id, earlier = job.run_id, job.earlier_resumes
    if run_id is None or earlier is None:  # claimed without them (a claim by id, a test)
        async with rt.db.sessions() as session:
            run = await session.get_one(BlockedRun, _run_id(job))
            run_id = run.run_id
            earlier = await repository.recent_resumes(
                session, run.account_id, run.run_id, rt.settings.resume_window
            )
    if earlier >= rt.settings.max_resumes:
        await _finish_resume(
            rt,
            job,
            Event.RESUME_LIMIT,
            f"the run blocked again after {earlier} resumes; stopping to avoid a loop",
            error_code="resume_limit_reached",
            error_message=(
                f"This run ran out of credits again after {earlier} resumes. Add credits or "
                "enable auto top-up in Mosaic, then retry."
            ),
        )
        return

    api_key = await rt.mosaic_key(job.account_id)
    if job.attempts > 1:
        # A retry may follow a resume Mosaic applied but whose answer was lost: read first.
        agent_run, _ = await rt.mosaic.get_run(api_key, run_id)
        if agent_run.status in RESUMED_STATUSES:
            await _finish_resume(
                rt, job, Event.RESUME_ACCEPTED, f"the run is {agent_run.status} already"
            )
            return
    try:
        await rt.mosaic.resume_run(api_key, run_id)
    except MosaicError as exc:
        if exc.status != 409:
            raise
        agent_run, _ = await rt.mosaic.get_run(api_key, run_id)
        if agent_run.status in RESUMED_STATUSES:
            await _finish_resume(
                rt,
                job,
                Event.RESUME_ACCEPTED,
                f"resume answered 409 and the run is {agent_run.status} already",
            )
        else:
            await _finish_resume(
                rt,
                job,
                Event.RESUME_REFUSED,
                f"resume answered 409 and the run is {agent_run.status}",
                error_code="resume_refused",
                error_message=f"Mosaic refused the resume ({exc.detail}); "
                f"the run is {agent_run.status}.",
            )
        return
    await _finish_resume(rt, job, Event.RESUME_ACCEPTED, "Mosaic accepted the resume")


def recorder(rt: Runtime) -> GroupCommit[ResumeOutcome]:
    """The process's group commit of resume outcomes (one per Runtime, made on first use)."""
    found = rt.batches.get(JobKind.RESUME)
    if found is None:
        found = GroupCommit(partial(finish_resumes, rt.db), limit=RESUME_BATCH)
        rt.batches[JobKind.RESUME] = found
    return cast(GroupCommit[ResumeOutcome], found)


async def _finish_resume(
    rt: Runtime,
    job: ClaimedJob,
    event: Event,
    reason: str,
    *,
    error_code: str | None = None,
    error_message: str | None = None,
) -> None:
    """Close the job and, if its run is still resuming, move the run: with other steps'
    outcomes in one transaction (`state_machine.finish_resumes`); LeaseLost if not ours."""
    outcome = ResumeOutcome(
        job.id, job.worker_id, _run_id(job), event, reason, error_code, error_message
    )
    if detached_recording.get():
        # In the worker loop the slot frees now; the group commit owns the outcome.
        recorder(rt).submit(job.id, outcome).add_done_callback(partial(_recorded, job))
        return
    begin_recording(rt.settings.job_lease)
    await recorder(rt).record(job.id, outcome)


def _recorded(job: ClaimedJob, done: asyncio.Future[None]) -> None:
    """How a detached outcome's commit went: the log and metrics `execute` would have written."""
    if done.cancelled():
        return
    exc = done.exception()
    if isinstance(exc, LeaseLost):
        metrics.JOBS.labels(job.kind, "lease_lost").inc()
        log.info("job %s (%s): lease lost or cancelled; outcome dropped", job.id, job.kind)
    elif exc is not None:
        # The job stays leased; when the lease runs out it is claimed again and reads first.
        log.warning(
            "job %s (%s): its outcome was not recorded (%s); retried after its lease",
            job.id,
            job.kind,
            exc,
        )


def _run_id(job: ClaimedJob) -> uuid.UUID:
    if job.blocked_run_id is None:
        raise ValueError(f"job {job.id} ({job.kind}) names no blocked run")
    return job.blocked_run_id


HANDLERS = {JobKind.RESUME: resume}
