"""A blocked run's own system step: the resume. The organization's steps (plan, checkout,
top-up) are the decision's, in `app.organizations.steps`.

A step reads what it needs, calls Mosaic with no transaction open, then in one transaction locks
the run, closes the job (refused if the lease was lost or the run was cancelled meanwhile), and
applies the outcome through the state machine.
"""

from __future__ import annotations

import uuid
from typing import Any

from app.blocked_runs import repository
from app.blocked_runs.models import BlockedRun
from app.blocked_runs.state_machine import Event, State, transition
from app.mosaic import MosaicError
from app.runtime import Runtime
from app.work_queue import ClaimedJob, JobKind, begin_recording, finish

SYSTEM = "system"


RESUMED_STATUSES = frozenset({"running", "completed"})


async def resume(rt: Runtime, job: ClaimedJob) -> None:
    """POST resume, once; a 409 is answered by re-reading the run (it may run already)."""
    async with rt.db.sessions() as session:
        run = await session.get_one(BlockedRun, _run_id(job))
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
        agent_run, _ = await rt.mosaic.get_run(api_key, run.run_id)
        if agent_run.status in RESUMED_STATUSES:
            await _finish_resume(
                rt, job, Event.RESUME_ACCEPTED, f"the run is {agent_run.status} already"
            )
            return
    try:
        await rt.mosaic.resume_run(api_key, run.run_id)
    except MosaicError as exc:
        if exc.status != 409:
            raise
        agent_run, _ = await rt.mosaic.get_run(api_key, run.run_id)
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


async def _finish_resume(
    rt: Runtime, job: ClaimedJob, event: Event, reason: str, **changes: Any
) -> None:
    begin_recording(rt.settings.job_lease)
    async with rt.db.transaction() as session:
        run = await repository.lock(session, _run_id(job))
        if await finish(session, job) and run.state == State.RESUMING:
            await transition(session, run, event, actor=SYSTEM, reason=reason, **changes)


def _run_id(job: ClaimedJob) -> uuid.UUID:
    if job.blocked_run_id is None:
        raise ValueError(f"job {job.id} ({job.kind}) names no blocked run")
    return job.blocked_run_id


HANDLERS = {JobKind.RESUME: resume}
