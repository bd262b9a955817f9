"""The decision's system steps: each reads Mosaic, writes only if needed, records the outcome.

Money is the product here. Every write to Mosaic is preceded by a read of the state it would
change, on first attempts and retries alike: `GET /plan` right before `POST /plan/upgrade` (a
paid plan means nothing is bought), `GET /credits` right before `POST /credits/settings` (the
same settings already there means nothing is sent). So an answer lost after Mosaic acted, or a
step repeated after a lost lease, never buys or writes twice.

Each step calls Mosaic with no transaction open, then in one transaction locks the decision,
closes its job (refused if the lease was lost) and moves the decision (and its runs).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from datetime import timedelta
from typing import Any

from sqlalchemy import func
from sqlalchemy.ext.asyncio import AsyncSession

from app.blocked_runs.state_machine import Event
from app.mosaic import (
    TOPUP_ELIGIBLE_PLANS,
    AutoTopup,
    MosaicError,
    PlanOffer,
    PlanState,
    UpgradeResult,
)
from app.organizations import recording, repository, spend_guard
from app.organizations.models import Decision
from app.organizations.service import (
    INLINE_RELEASE,
    RELEASE_BATCH,
    SYSTEM,
    decide,
    release_runs,
    topup_cap,
)
from app.organizations.state_machine import TRANSITIONS, DecisionState, update_fields
from app.runtime import Runtime
from app.work_queue import (
    ClaimedJob,
    JobKind,
    NotYet,
    begin_recording,
    enqueue_decision_job,
    finish,
    finish_on,
    note,
)

log = logging.getLogger(__name__)

CHOOSING = (DecisionState.AWAITING_CHOICE, DecisionState.AWAITING_CHECKOUT)
# A release of at least this many runs ends by refreshing the planner's statistics.
ANALYZE_AFTER_RELEASE = 1000
# Where a newly blocked run opens a new round of the decision (from the decision's table).
NEW_ROUND_FROM = frozenset(state for state, event in TRANSITIONS if event is Event.BLOCKED)


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


def settle_before_retry(rt: Runtime, exc: MosaicError) -> MosaicError:
    """A write whose answer was lost may still be under way at Mosaic: the retry (which reads
    before writing again) waits long enough for such a request to land first."""
    if exc.ambiguous:
        settle = 2 * rt.settings.mosaic_timeout.total_seconds()
        exc.retry_after = max(exc.retry_after or 0.0, settle)
    return exc


def requested_by(job: ClaimedJob) -> str:
    """Who a step acts for: the person whose action recorded it, else the system."""
    return str(job.payload.get("requested_by") or SYSTEM)


def acted_through(job: ClaimedJob) -> uuid.UUID | None:
    """The blocked run a person acted through, if they did (its history names them)."""
    via = job.payload.get("via_run")
    return uuid.UUID(via) if via else None


class _Reading:
    """What Mosaic says of the organization's plan (and, when paid, its auto top-up)."""

    def __init__(self, plan: PlanState, auto_topup: AutoTopup | None, offers: list[PlanOffer]):
        self.plan = plan
        self.auto_topup = auto_topup
        self.offers = offers

    @property
    def plan_id(self) -> str | None:
        return self.plan.plan.id if self.plan.plan else None


async def _read_plan(rt: Runtime, api_key: str, *, offers: bool) -> _Reading:
    plan = await rt.mosaic.get_plan(api_key)
    if plan.is_paid:
        return _Reading(plan, (await rt.mosaic.get_credits(api_key)).auto_topup, [])
    return _Reading(plan, None, await rt.mosaic.list_plans(api_key) if offers else [])


def _paid_move(reading: _Reading, *, event: Event, why: str) -> tuple[Event, str, dict[str, Any]]:
    """Mosaic shows a paid plan: to the top-up question, or decided if auto top-up is on (the
    event, the reason and the decision's new data; `decided_at` as `recording.NOW`)."""
    topup = topup_view(reading.plan_id, reading.auto_topup)
    changes: dict[str, Any] = {
        "plan": plan_view(reading.plan),
        "topup": topup,
        "checkout_url": None,
        "checkout_opened_at": None,
        "error_code": None,
        "error_message": None,
    }
    if reading.offers:
        changes["plans"] = [o.model_dump(mode="json") for o in reading.offers]
    if topup["enabled"]:
        changes["decided_at"] = recording.NOW
        reason = f"{why} {reading.plan_id}, auto top-up already on"
        return Event.PLAN_PAID_TOPUP_ON, reason, changes
    return event, f"{why} {reading.plan_id}", changes


async def _on_paid(
    rt: Runtime,
    session: AsyncSession,
    decision: Decision,
    reading: _Reading,
    *,
    event: Event,
    actor: str,
    why: str,
    acting_run: uuid.UUID | None = None,
) -> None:
    """Mosaic shows a paid plan: to the top-up question, or decided if auto top-up is on."""
    event, reason, changes = _paid_move(reading, event=event, why=why)
    orm_changes = {k: func.now() if v is recording.NOW else v for k, v in changes.items()}
    await decide(
        rt,
        session,
        decision,
        event,
        actor=actor,
        acting_run=acting_run,
        reason=reason,
        **orm_changes,
    )


async def check_plan(rt: Runtime, job: ClaimedJob) -> None:
    """Open a round of the decision, then GET /plan; free → GET /plan/list and offer plans;
    paid → GET /credits for auto top-up.

    The busiest step (one per newly blocked organization), so both of its transactions run on
    the plain asyncpg pool (`app.organizations.recording`): the same locks, checks and rows as
    the ORM path the other steps take, in a few round trips.
    """
    # One statement, its own transaction: lock the decision, open a round if none is open.
    pool = await rt.db.driver_pool()
    async with pool.acquire() as conn:
        for _ in range(2):
            opened = await recording.move(
                conn,
                job.account_id,
                Event.BLOCKED,
                froms=NEW_ROUND_FROM,
                actor=SYSTEM,
                reason="a blocked run made the organization's plan a question",
                plans=None,
                checkout_url=None,
                checkout_opened_at=None,
                error_code=None,
                error_message=None,
            )
            if opened.state is not None:
                break
            # The account's first step: its decision row is made on first use.
            await conn.execute(
                "INSERT INTO organization_decisions (account_id) VALUES ($1)"
                " ON CONFLICT DO NOTHING",
                job.account_id,
            )
    if opened.state is None:
        raise LookupError(f"account {job.account_id} is gone")
    if not opened.moved and opened.state != DecisionState.CHECKING_PLAN:
        async with rt.db.raw() as conn:
            await recording.lock(conn, job.account_id)
            await finish_on(conn, job)  # nothing to check: the decision is past it
        return
    api_key = await rt.mosaic_key(job.account_id, encrypted=opened.encrypted_key)
    reading = await _read_plan(rt, api_key, offers=True)
    if reading.plan.is_paid and not (reading.auto_topup and reading.auto_topup.enabled):
        # The top-up question is asked with its price: the plan list has the top-up rate.
        reading.offers = await rt.mosaic.list_plans(api_key)
    if reading.plan.is_paid:
        event, reason, changes = _paid_move(reading, event=Event.PLAN_PAID, why="paid plan")
    else:
        event, reason = Event.PLAN_FREE, "the organization is on no paid plan"
        changes = {
            "plan": plan_view(reading.plan),
            "plans": [o.model_dump(mode="json") for o in reading.offers],
            "topup": topup_view(None, None),
        }
    begin_recording(rt.settings.job_lease)
    async with rt.db.raw() as conn:
        # The job closes whatever the decision's state; the decision moves (with its runs)
        # only if it is still checking the plan.
        await recording.decide(
            conn,
            job.account_id,
            event,
            froms=(DecisionState.CHECKING_PLAN,),
            actor=SYSTEM,
            reason=reason,
            job=job,
            release_limit=INLINE_RELEASE,
            give_up_after_seconds=rt.settings.give_up_after.total_seconds(),
            **changes,
        )


async def upgrade_plan(rt: Runtime, job: ClaimedJob) -> None:
    """GET /plan, then POST /plan/upgrade only if the organization is still on no paid plan."""
    plan_id: str = job.payload["plan_id"]
    actor = requested_by(job)
    api_key = await rt.mosaic_key(job.account_id)
    # Read right before buying, on every attempt: a retry after a lost answer, a plan bought in
    # Mosaic's dashboard, or a checkout paid meanwhile all show here as a paid plan.
    reading = await _read_plan(rt, api_key, offers=False)
    if reading.plan.is_paid:
        begin_recording(rt.settings.job_lease)
        async with rt.db.transaction() as session:
            decision = await repository.lock(session, job.account_id)
            if not await finish(session, job) or decision.state not in CHOOSING:
                return
            await _on_paid(
                rt,
                session,
                decision,
                reading,
                event=Event.PLAN_PAID,
                actor=actor,
                acting_run=acted_through(job),
                why="nothing bought: the organization is on paid plan",
            )
        return
    answered = job.payload.get("upgrade_answer")
    if answered is not None:
        # An earlier attempt was answered but died before recording it: use that answer. For a
        # checkout, asking again would open a second one.
        result = UpgradeResult.model_validate(answered)
    else:
        try:
            result = await rt.mosaic.upgrade_plan(
                api_key,
                plan_id,
                success_url=rt.settings.checkout_success_url,
                cancel_url=rt.settings.checkout_cancel_url,
            )
        except MosaicError as exc:
            if exc.transient:
                raise settle_before_retry(rt, exc) from None
            await _record_problem(
                rt, job, "upgrade_refused", f"Mosaic refused the upgrade to {plan_id}: {exc.detail}"
            )
            return
        # Keeping Mosaic's answer is the first part of recording it: out of Mosaic's time box.
        begin_recording(rt.settings.job_lease)
        await note(rt.db, job, upgrade_answer=result.model_dump(mode="json"))

    begin_recording(rt.settings.job_lease)
    async with rt.db.transaction() as session:
        decision = await repository.lock(session, job.account_id)
        if not await finish(session, job):
            return
        if result.requires_checkout:
            if decision.state not in CHOOSING:
                return
            if not result.checkout_url:
                await update_fields(
                    session,
                    decision,
                    error_code="checkout_missing",
                    error_message="Mosaic asked for a checkout but sent no checkout_url.",
                )
                return
            await decide(
                rt,
                session,
                decision,
                Event.CHECKOUT_REQUIRED,
                actor=actor,
                acting_run=acted_through(job),
                reason=f"upgrade to {plan_id} needs the hosted checkout",
                chosen_plan_id=plan_id,
                checkout_url=result.checkout_url,
                checkout_opened_at=func.now(),
                error_code=None,
                error_message=None,
            )
            await enqueue_decision_job(
                session,
                JobKind.POLL_CHECKOUT,
                account_id=job.account_id,
                give_up_after=rt.settings.checkout_ttl,
                delay=rt.settings.checkout_poll,
            )
            return
        new_plan_id = result.plan_id or plan_id
        upgraded = {"id": new_plan_id, "family": result.plan_family, "status": "active"}
        changes: dict[str, Any] = {
            "chosen_plan_id": plan_id,
            "plan": {k: v for k, v in upgraded.items() if v is not None},
            "topup": topup_view(new_plan_id, None),
            "checkout_url": None,
            "checkout_opened_at": None,
            "error_code": None,
            "error_message": None,
        }
        if decision.state not in CHOOSING:
            # Mosaic bought it, whatever happened here meanwhile: keep the record.
            await update_fields(session, decision, **changes)
            return
        await decide(
            rt,
            session,
            decision,
            Event.UPGRADED,
            actor=actor,
            acting_run=acted_through(job),
            reason=f"upgraded to {new_plan_id}",
            **changes,
        )


async def confirm_checkout(rt: Runtime, job: ClaimedJob) -> None:
    """A fresh GET /plan: only a paid plan there moves the decision past checkout."""
    api_key = await rt.mosaic_key(job.account_id)
    reading = await _read_plan(rt, api_key, offers=False)
    begin_recording(rt.settings.job_lease)
    async with rt.db.transaction() as session:
        decision = await repository.lock(session, job.account_id)
        if not await finish(session, job) or decision.state != DecisionState.AWAITING_CHECKOUT:
            return
        if not reading.plan.is_paid:
            await update_fields(
                session,
                decision,
                plan=plan_view(reading.plan),
                error_code="checkout_incomplete",
                error_message=(
                    "Mosaic does not show a paid plan yet. Finish the checkout at "
                    "checkout_url, then confirm again."
                ),
            )
            return
        await _on_paid(
            rt,
            session,
            decision,
            reading,
            event=Event.CHECKOUT_CONFIRMED,
            actor=requested_by(job),
            acting_run=acted_through(job),
            why="Mosaic shows paid plan",
        )


async def poll_checkout(rt: Runtime, job: ClaimedJob) -> None:
    """While a checkout is open, re-read GET /plan with backoff: a paid checkout moves on
    with no click at all."""
    async with rt.db.sessions() as session:
        decision = await repository.get(session, job.account_id)
    if decision is not None and decision.state == DecisionState.AWAITING_CHECKOUT:
        api_key = await rt.mosaic_key(job.account_id)
        reading = await _read_plan(rt, api_key, offers=False)
        if not reading.plan.is_paid:
            first = rt.settings.checkout_poll.total_seconds()
            delay = min(
                first * 2 ** min(job.attempts, 16), rt.settings.checkout_poll_max.total_seconds()
            )
            raise NotYet("the checkout is not paid yet", delay=timedelta(seconds=delay))
    else:
        reading = None
    begin_recording(rt.settings.job_lease)
    async with rt.db.transaction() as session:
        decision = await repository.lock(session, job.account_id)
        if not await finish(session, job) or reading is None:
            return
        if decision.state != DecisionState.AWAITING_CHECKOUT:
            return
        if await repository.pending_step(session, job.account_id) is not None:
            return  # a person's step (confirm, another plan) is under way and will decide
        await _on_paid(
            rt,
            session,
            decision,
            reading,
            event=Event.CHECKOUT_CONFIRMED,
            actor=SYSTEM,
            why="checkout paid; Mosaic shows paid plan",
        )


async def set_topup(rt: Runtime, job: ClaimedJob) -> None:
    """GET /credits, then POST /credits/settings unless auto top-up is set so already."""
    threshold: int = job.payload["threshold"]
    quantity: int = job.payload["quantity"]
    api_key = await rt.mosaic_key(job.account_id)
    async with rt.db.sessions() as session:
        cap = await topup_cap(session, job.account_id)
        decision = await repository.get(session, job.account_id)
    if cap is not None and decision is not None:
        # The cap, or the plan, may have changed since the person answered: check again,
        # right before the write, with the plan list's rate if none is stored.
        price = spend_guard.price_for(decision.plan, decision.plans)
        if price is None:
            offers = [o.model_dump(mode="json") for o in await rt.mosaic.list_plans(api_key)]
            price = spend_guard.price_for(decision.plan, offers)
        if refused := spend_guard.refusal(cap, price, quantity):
            await _record_problem(rt, job, refused.code, refused.detail)
            return
    current = (await rt.mosaic.get_credits(api_key)).auto_topup
    if (
        current is not None
        and current.enabled
        and int(current.threshold) == threshold
        and int(current.quantity) == quantity
    ):
        stored = current  # a retry after a lost answer: Mosaic has it already
    else:
        try:
            stored = await rt.mosaic.set_auto_topup(
                api_key, enabled=True, threshold=threshold, quantity=quantity
            )
        except MosaicError as exc:
            if exc.transient:
                raise settle_before_retry(rt, exc) from None
            code = "topup_not_allowed" if exc.status == 403 else "topup_refused"
            await _record_problem(
                rt, job, code, f"Mosaic refused to enable auto top-up: {exc.detail}"
            )
            return
    begin_recording(rt.settings.job_lease)
    async with rt.db.transaction() as session:
        decision = await repository.lock(session, job.account_id)
        if not await finish(session, job) or decision.state != DecisionState.TOPUP_PROMPT:
            return
        topup = {
            "eligible": True,
            "enabled": stored.enabled,
            "threshold": int(stored.threshold),
            "quantity": int(stored.quantity),
        }
        await decide(
            rt,
            session,
            decision,
            Event.TOPUP_ENABLED,
            actor=requested_by(job),
            acting_run=acted_through(job),
            reason=f"auto top-up enabled: {topup['quantity']} credits below {topup['threshold']}",
            topup=topup,
            decided_at=func.now(),
            error_code=None,
            error_message=None,
        )


async def release_waiting_runs(rt: Runtime, job: ClaimedJob) -> None:
    """Move the rest of a large organization's waiting runs, one bounded batch per transaction.

    Each batch takes the decision's lock and follows its latest move, so a batch never moves a
    run past a decision that changed meanwhile; the job closes in the batch that finds the
    rest smaller than a batch, under that same lock (a later move enqueues a new release).

    A release this large changes what the planner should know of the runs and jobs (thousands
    now `resuming`, as many resume jobs pending), and the statements each connection has
    prepared keep the plans they were given on the statistics from before: on a young
    database, plans for nearly empty tables that walk every resume job or run per claim or
    batch, until autovacuum analyzes the tables a minute or more later. So the release ends by
    having them analyzed, in the background: outside the step's time box, and never a reason
    to retry a release that is done.
    """
    released = 0
    while True:
        async with rt.db.transaction() as session:
            decision = await repository.lock(session, job.account_id)
            moved = await release_runs(
                rt, session, decision, actor=SYSTEM, limit=RELEASE_BATCH, enqueue_rest=False
            )
            released += moved
            if moved < RELEASE_BATCH:
                await finish(session, job)
                break
    if released >= ANALYZE_AFTER_RELEASE:
        rt.keep(asyncio.create_task(_refresh_statistics(rt, released), name="analyze"))


async def _refresh_statistics(rt: Runtime, released: int) -> None:
    started = time.perf_counter()
    try:
        await rt.db.analyze("jobs", "blocked_runs")
    except Exception:  # an optimisation: autovacuum will get there anyway
        log.warning(
            "released %d runs; analyzing jobs and blocked_runs failed", released, exc_info=True
        )
        return
    log.info(
        "released %d runs; statistics of jobs and blocked_runs refreshed in %.0f ms",
        released,
        (time.perf_counter() - started) * 1000,
    )


async def _record_problem(rt: Runtime, job: ClaimedJob, code: str, message: str) -> None:
    """Mosaic said no to a person's request: keep the state, show why, let them choose again."""
    begin_recording(rt.settings.job_lease)
    async with rt.db.transaction() as session:
        decision = await repository.lock(session, job.account_id)
        if await finish(session, job):
            await update_fields(session, decision, error_code=code, error_message=message)


HANDLERS = {
    JobKind.CHECK_PLAN: check_plan,
    JobKind.UPGRADE_PLAN: upgrade_plan,
    JobKind.CONFIRM_CHECKOUT: confirm_checkout,
    JobKind.POLL_CHECKOUT: poll_checkout,
    JobKind.SET_TOPUP: set_topup,
    JobKind.RELEASE_RUNS: release_waiting_runs,
}
