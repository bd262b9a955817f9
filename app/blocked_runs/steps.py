"""The system steps that move a blocked run: each calls Mosaic, then records the outcome.

Every step runs the same way: read what it needs, call Mosaic with no transaction open, then in
one transaction lock the run, close the job (refused if the lease was lost or the run was
cancelled meanwhile), and apply the outcome through the state machine.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from app.blocked_runs import repository
from app.blocked_runs.models import BlockedRun
from app.blocked_runs.state_machine import Event, State, transition, update_fields
from app.mosaic import TOPUP_ELIGIBLE_PLANS, AutoTopup, MosaicError, PlanState
from app.runtime import Runtime
from app.work_queue import ClaimedJob, JobKind, enqueue, finish

SYSTEM = "system"


def plan_view(plan: PlanState) -> dict[str, Any] | None:
    if plan.plan is None:
        return None
    return plan.plan.model_dump(mode="json", exclude_none=True)


def topup_view(plan_id: str | None, auto_topup: AutoTopup | None) -> dict[str, Any]:
    eligible = auto_topup.eligible if auto_topup and auto_topup.eligible is not None else None
    if eligible is None:
        eligible = plan_id in TOPUP_ELIGIBLE_PLANS
    return {
        "eligible": eligible,
        "enabled": bool(auto_topup and auto_topup.enabled),
        "threshold": int(auto_topup.threshold) if auto_topup else 0,
        "quantity": int(auto_topup.quantity) if auto_topup else 0,
    }


async def enqueue_step(
    rt: Runtime, session: AsyncSession, run: BlockedRun, kind: JobKind, **payload: Any
) -> int:
    return await enqueue(
        session,
        kind,
        account_id=run.account_id,
        blocked_run_id=run.id,
        payload=payload,
        give_up_after=rt.settings.give_up_after,
    )


def requested_by(job: ClaimedJob) -> str:
    """Who a step acts for: the person whose action recorded it, else the system."""
    return str(job.payload.get("requested_by") or SYSTEM)


async def enter_resuming(
    rt: Runtime,
    session: AsyncSession,
    run: BlockedRun,
    event: Event,
    reason: str,
    *,
    actor: str = SYSTEM,
    **changes: Any,
) -> None:
    run = await transition(session, run, event, actor=actor, reason=reason, **changes)
    await enqueue_step(rt, session, run, JobKind.RESUME)


async def organization_plan_paid(session: AsyncSession, decided_on: BlockedRun) -> None:
    """The organization is on a paid plan now: its other runs waiting on a plan move on too."""
    others = await repository.lock_organization_runs(
        session,
        decided_on.account_id,
        (State.AWAITING_CHOICE, State.AWAITING_CHECKOUT),
        except_id=decided_on.id,
    )
    for other in others:
        if other.pending:  # its own step is in flight and will land on its own
            continue
        await transition(
            session,
            other,
            Event.ORG_PLAN_PAID,
            actor=SYSTEM,
            reason=f"organization's plan became paid on blocked run {decided_on.id}",
            plan=decided_on.plan,
            topup=decided_on.topup,
            error_code=None,
            error_message=None,
        )


async def organization_topup_answered(
    rt: Runtime, session: AsyncSession, decided_on: BlockedRun
) -> None:
    """The top-up question was answered: every other run waiting on it goes to resume."""
    await repository.mark_topup_answered(session, decided_on.account_id)
    others = await repository.lock_organization_runs(
        session, decided_on.account_id, (State.TOPUP_PROMPT,), except_id=decided_on.id
    )
    for other in others:
        if other.pending:
            continue
        await enter_resuming(
            rt,
            session,
            other,
            Event.ORG_TOPUP_ANSWERED,
            f"auto top-up answered on blocked run {decided_on.id}",
            topup=decided_on.topup,
        )


async def check_plan(rt: Runtime, job: ClaimedJob) -> None:
    """GET /plan; free → GET /plan/list and offer plans; paid → GET /credits for auto top-up."""
    api_key = await rt.mosaic_key(job.account_id)
    plan = await rt.mosaic.get_plan(api_key)
    offers: list[dict[str, Any]] | None = None
    auto_topup: AutoTopup | None = None
    if plan.is_paid:
        auto_topup = (await rt.mosaic.get_credits(api_key)).auto_topup
    else:
        offers = [o.model_dump(mode="json") for o in await rt.mosaic.list_plans(api_key)]

    async with rt.db.transaction() as session:
        run = await repository.lock(session, _run_id(job))
        await finish(session, job)
        if run.state != State.CHECKING_PLAN:
            return
        plan_id = plan.plan.id if plan.plan else None
        topup = topup_view(plan_id, auto_topup)
        if offers is not None:
            await transition(
                session,
                run,
                Event.PLAN_FREE,
                actor=SYSTEM,
                reason="organization is on no paid plan",
                plan=plan_view(plan),
                plans=offers,
                topup=topup,
            )
        elif topup["enabled"]:
            await enter_resuming(
                rt,
                session,
                run,
                Event.PLAN_PAID_TOPUP_ON,
                f"paid plan {plan_id} with auto top-up on",
                plan=plan_view(plan),
                topup=topup,
            )
        else:
            answered = await repository.topup_answered_at(session, run.account_id)
            if answered is not None and answered >= run.created_at:
                await transition(
                    session,
                    run,
                    Event.PLAN_PAID,
                    actor=SYSTEM,
                    reason=f"paid plan {plan_id}",
                    plan=plan_view(plan),
                    topup=topup,
                )
                await enter_resuming(
                    rt,
                    session,
                    run,
                    Event.ORG_TOPUP_ANSWERED,
                    "auto top-up already answered for the organization",
                )
                return
            await transition(
                session,
                run,
                Event.PLAN_PAID,
                actor=SYSTEM,
                reason=f"paid plan {plan_id}; auto top-up is off",
                plan=plan_view(plan),
                topup=topup,
            )


async def upgrade_plan(rt: Runtime, job: ClaimedJob) -> None:
    """POST /plan/upgrade with the chosen plan: switched at once, or a hosted checkout."""
    plan_id: str = job.payload["plan_id"]
    api_key = await rt.mosaic_key(job.account_id)
    try:
        result = await rt.mosaic.upgrade_plan(
            api_key,
            plan_id,
            success_url=rt.settings.checkout_success_url,
            cancel_url=rt.settings.checkout_cancel_url,
        )
    except MosaicError as exc:
        if exc.transient:
            raise
        # Refused, perhaps because another run's upgrade got the organization there first:
        # Mosaic's plan decides whether there is anything left to choose.
        plan = await rt.mosaic.get_plan(api_key)
        if plan.is_paid:
            await _plan_paid_meanwhile(rt, job, plan)
            return
        await _record_problem(
            rt, job, "upgrade_refused", f"Mosaic refused the upgrade to {plan_id}: {exc.detail}"
        )
        return

    async with rt.db.transaction() as session:
        run = await _lock_for_organization(session, job)
        await finish(session, job)
        if run.state not in (State.AWAITING_CHOICE, State.AWAITING_CHECKOUT):
            return
        if result.requires_checkout:
            if not result.checkout_url:
                await update_fields(
                    session,
                    run,
                    error_code="checkout_missing",
                    error_message="Mosaic asked for a checkout but sent no checkout_url.",
                )
                return
            await transition(
                session,
                run,
                Event.CHECKOUT_REQUIRED,
                actor=requested_by(job),
                reason=f"upgrade to {plan_id} needs the hosted checkout",
                chosen_plan_id=plan_id,
                checkout_url=result.checkout_url,
                error_code=None,
                error_message=None,
            )
            return
        new_plan_id = result.plan_id or plan_id
        upgraded = {"id": new_plan_id, "family": result.plan_family, "status": "active"}
        run = await transition(
            session,
            run,
            Event.UPGRADED,
            actor=requested_by(job),
            reason=f"upgraded to {new_plan_id}",
            chosen_plan_id=plan_id,
            plan={k: v for k, v in upgraded.items() if v is not None},
            topup=topup_view(new_plan_id, None),
            checkout_url=None,
            error_code=None,
            error_message=None,
        )
        await organization_plan_paid(session, run)


async def _on_paid_plan(
    session: AsyncSession, run: BlockedRun, plan: PlanState, event: Event, actor: str, why: str
) -> None:
    """A fresh GET /plan shows a paid plan: on to the top-up question, with the siblings."""
    plan_id = plan.plan.id if plan.plan else None
    run = await transition(
        session,
        run,
        event,
        actor=actor,
        reason=f"{why} {plan_id}",
        plan=plan_view(plan),
        topup=topup_view(plan_id, None),
        checkout_url=None,
        error_code=None,
        error_message=None,
    )
    await organization_plan_paid(session, run)


async def _plan_paid_meanwhile(rt: Runtime, job: ClaimedJob, plan: PlanState) -> None:
    async with rt.db.transaction() as session:
        run = await _lock_for_organization(session, job)
        await finish(session, job)
        if run.state not in (State.AWAITING_CHOICE, State.AWAITING_CHECKOUT):
            return
        await _on_paid_plan(
            session, run, plan, Event.ORG_PLAN_PAID, SYSTEM, "the organization is on paid plan"
        )


async def confirm_checkout(rt: Runtime, job: ClaimedJob) -> None:
    """A fresh GET /plan: only a paid plan there moves the run past checkout."""
    api_key = await rt.mosaic_key(job.account_id)
    plan = await rt.mosaic.get_plan(api_key)
    async with rt.db.transaction() as session:
        run = await _lock_for_organization(session, job)
        await finish(session, job)
        if run.state != State.AWAITING_CHECKOUT:
            return
        if not plan.is_paid:
            await update_fields(
                session,
                run,
                plan=plan_view(plan),
                error_code="checkout_incomplete",
                error_message=(
                    "Mosaic does not show a paid plan yet. Finish the checkout at "
                    "checkout_url, then confirm again."
                ),
            )
            return
        await _on_paid_plan(
            session,
            run,
            plan,
            Event.CHECKOUT_CONFIRMED,
            requested_by(job),
            "Mosaic shows paid plan",
        )


async def set_topup(rt: Runtime, job: ClaimedJob) -> None:
    """POST /credits/settings enabling auto top-up; then this run and its siblings resume."""
    threshold: int = job.payload["threshold"]
    quantity: int = job.payload["quantity"]
    api_key = await rt.mosaic_key(job.account_id)
    try:
        stored = await rt.mosaic.set_auto_topup(
            api_key, enabled=True, threshold=threshold, quantity=quantity
        )
    except MosaicError as exc:
        if exc.transient:
            raise
        code = "topup_not_allowed" if exc.status == 403 else "topup_refused"
        await _record_problem(rt, job, code, f"Mosaic refused to enable auto top-up: {exc.detail}")
        return
    async with rt.db.transaction() as session:
        run = await _lock_for_organization(session, job)
        await finish(session, job)
        if run.state != State.TOPUP_PROMPT:
            return
        topup = {
            "eligible": True,
            "enabled": stored.enabled,
            "threshold": int(stored.threshold),
            "quantity": int(stored.quantity),
        }
        await enter_resuming(
            rt,
            session,
            run,
            Event.TOPUP_ENABLED,
            f"auto top-up enabled: {topup['quantity']} credits below {topup['threshold']}",
            actor=requested_by(job),
            topup=topup,
            error_code=None,
            error_message=None,
        )
        await organization_topup_answered(rt, session, run)


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
    async with rt.db.transaction() as session:
        run = await repository.lock(session, _run_id(job))
        await finish(session, job)
        if run.state == State.RESUMING:
            await transition(session, run, event, actor=SYSTEM, reason=reason, **changes)


async def _record_problem(rt: Runtime, job: ClaimedJob, code: str, message: str) -> None:
    """Mosaic said no to a person's request: keep the state, show why, let them choose again."""
    async with rt.db.transaction() as session:
        run = await repository.lock(session, _run_id(job))
        await finish(session, job)
        await update_fields(session, run, error_code=code, error_message=message)


async def _lock_for_organization(session: AsyncSession, job: ClaimedJob) -> BlockedRun:
    """Lock the account, then the run: every transaction that may move the organization's other
    runs takes its locks in this order, so two such decisions queue instead of deadlocking."""
    await repository.lock_account(session, job.account_id)
    return await repository.lock(session, _run_id(job))


def _run_id(job: ClaimedJob) -> uuid.UUID:
    if job.blocked_run_id is None:
        raise ValueError(f"job {job.id} ({job.kind}) names no blocked run")
    return job.blocked_run_id


HANDLERS = {
    JobKind.CHECK_PLAN: check_plan,
    JobKind.UPGRADE_PLAN: upgrade_plan,
    JobKind.CONFIRM_CHECKOUT: confirm_checkout,
    JobKind.SET_TOPUP: set_topup,
    JobKind.RESUME: resume,
}
