"""The billing state machine of a blocked run: one declared table, one way to change state.

Read the table top to bottom like the one in the README ("How a blocked run moves").
`transition()` is the only code that writes `state`: a guarded UPDATE (expected state and
version) plus a history row, in the caller's transaction. Anything not in the table is
refused with a 409 naming the current state.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import asyncpg
from sqlalchemy import func, insert, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from app import metrics
from app.blocked_runs.models import BlockedRun, HistoryEntry
from app.database import Database, compile_named
from app.errors import Conflict
from app.notifications import JOBS_CHANNEL, RUN_EVENTS_CHANNEL, notify
from app.subscriptions import outbox
from app.work_queue import JobKind, cancel_pending, organization_key


class State(StrEnum):
    CHECKING_PLAN = "checking_plan"
    AWAITING_CHOICE = "awaiting_choice"
    AWAITING_CHECKOUT = "awaiting_checkout"
    TOPUP_PROMPT = "topup_prompt"
    RESUMING = "resuming"
    RESUMED = "resumed"
    CANCELLED = "cancelled"
    FAILED = "failed"
    EXPIRED = "expired"


class Event(StrEnum):
    BLOCKED = "blocked"  # a credit-blocked run was detected or registered
    # Moves of the organization's decision, applied to the runs waiting on it:
    PLAN_FREE = "plan_free"  # GET /plan: no paid plan; plans listed
    PLAN_PAID = "plan_paid"  # GET /plan: paid, auto top-up off
    PLAN_PAID_TOPUP_ON = "plan_paid_topup_on"  # GET /plan: paid, auto top-up already on
    UPGRADED = "upgraded"  # POST /plan/upgrade switched the plan at once
    CHECKOUT_REQUIRED = "checkout_required"  # POST /plan/upgrade answered a checkout_url
    CHECKOUT_CONFIRMED = "checkout_confirmed"  # a fresh GET /plan shows a paid plan
    CHECKOUT_EXPIRED = "checkout_expired"  # the checkout stayed open too long: choose again
    TOPUP_ENABLED = "topup_enabled"  # POST /credits/settings succeeded (or was so already)
    TOPUP_DECLINED = "topup_declined"  # a person said no to auto top-up
    ORG_TOPUP_ANSWERED = "org_topup_answered"  # blocked as the organization's answer landed
    # The run's own moves:
    RESUME_ACCEPTED = "resume_accepted"  # POST resume succeeded, or the run runs again already
    RESUME_REFUSED = "resume_refused"  # POST resume answered 409 and the run is not running
    RESUME_LIMIT = "resume_limit"  # the run keeps blocking again after resumes
    RUN_RESTARTED = "run_restarted"  # Mosaic confirms the run runs again (resumed elsewhere)
    CANCEL = "cancel"
    GIVE_UP = "give_up"  # Mosaic stayed unreachable or refused a needed call
    EXPIRE = "expire"  # nobody answered within the decision TTL
    RETRY = "retry"


class Action(StrEnum):
    CHOOSE_PLAN = "choose_plan"
    CONFIRM_CHECKOUT = "confirm_checkout"
    TOPUP = "topup"
    CANCEL = "cancel"
    RETRY = "retry"


ACTIVE_STATES = frozenset(
    {
        State.CHECKING_PLAN,
        State.AWAITING_CHOICE,
        State.AWAITING_CHECKOUT,
        State.TOPUP_PROMPT,
        State.RESUMING,
    }
)
TERMINAL_STATES = frozenset(State) - ACTIVE_STATES
# States that wait for a person; they expire when nobody answers.
WAITING_STATES = frozenset({State.AWAITING_CHOICE, State.AWAITING_CHECKOUT, State.TOPUP_PROMPT})

# States in which a run waits on its organization's decision.
DECIDING_STATES = frozenset(
    {State.CHECKING_PLAN, State.AWAITING_CHOICE, State.AWAITING_CHECKOUT, State.TOPUP_PROMPT}
)

S, E = State, Event
_CHOOSING = (S.CHECKING_PLAN, S.AWAITING_CHOICE, S.AWAITING_CHECKOUT)
TRANSITIONS: dict[tuple[State | None, Event], State] = {
    (None, E.BLOCKED): S.CHECKING_PLAN,
    # The decision's moves. A run may lag a move behind its decision while a large
    # organization is released in batches, so later moves also apply to earlier states.
    (S.CHECKING_PLAN, E.PLAN_FREE): S.AWAITING_CHOICE,
    (S.AWAITING_CHECKOUT, E.CHECKOUT_EXPIRED): S.AWAITING_CHOICE,
    (S.CHECKING_PLAN, E.CHECKOUT_REQUIRED): S.AWAITING_CHECKOUT,
    (S.AWAITING_CHOICE, E.CHECKOUT_REQUIRED): S.AWAITING_CHECKOUT,
    **{(state, E.PLAN_PAID): S.TOPUP_PROMPT for state in _CHOOSING},
    **{(state, E.UPGRADED): S.TOPUP_PROMPT for state in _CHOOSING},
    **{(state, E.CHECKOUT_CONFIRMED): S.TOPUP_PROMPT for state in _CHOOSING},
    **{
        (state, event): S.RESUMING
        for state in DECIDING_STATES
        for event in (
            E.PLAN_PAID_TOPUP_ON,
            E.TOPUP_ENABLED,
            E.TOPUP_DECLINED,
            E.ORG_TOPUP_ANSWERED,
        )
    },
    # The run's own moves.
    (S.RESUMING, E.RESUME_ACCEPTED): S.RESUMED,
    (S.RESUMING, E.RESUME_REFUSED): S.FAILED,
    (S.RESUMING, E.RESUME_LIMIT): S.FAILED,
    **{(state, E.RUN_RESTARTED): S.RESUMED for state in ACTIVE_STATES},
    **{(state, E.CANCEL): S.CANCELLED for state in ACTIVE_STATES},
    **{(state, E.GIVE_UP): S.FAILED for state in ACTIVE_STATES},
    **{(state, E.EXPIRE): S.EXPIRED for state in WAITING_STATES},
    (S.FAILED, E.RETRY): S.CHECKING_PLAN,
}

# What a person or service may ask for in each state (while no system step is under way).
ACTIONS: dict[State, tuple[Action, ...]] = {
    S.CHECKING_PLAN: (Action.CANCEL,),
    S.AWAITING_CHOICE: (Action.CHOOSE_PLAN, Action.CANCEL),
    S.AWAITING_CHECKOUT: (Action.CONFIRM_CHECKOUT, Action.CHOOSE_PLAN, Action.CANCEL),
    S.TOPUP_PROMPT: (Action.TOPUP, Action.CANCEL),
    S.RESUMING: (Action.CANCEL,),
    S.RESUMED: (),
    S.CANCELLED: (),
    S.FAILED: (Action.RETRY,),
    S.EXPIRED: (),
}


def actions_for(state: str, *, pending: bool) -> list[str]:
    allowed = ACTIONS[State(state)]
    if pending:
        # While Mosaic is being called for this run, a person may only cancel.
        allowed = tuple(a for a in allowed if a is Action.CANCEL)
    return [a.value for a in allowed]


class IllegalTransition(Conflict):
    code = "invalid_state"


def require_action(run: BlockedRun, action: Action) -> None:
    """Refuse an action the run's state does not offer, naming the state (409)."""
    if action.value not in actions_for(run.state, pending=run.pending):
        why = "a system step is under way" if run.pending else f"the run is {run.state}"
        raise IllegalTransition(
            f"Cannot {action.value.replace('_', ' ')}: {why}.",
            state=run.state,
            pending=run.pending,
            actions=actions_for(run.state, pending=run.pending),
        )


def target_of(state: str | None, event: Event) -> State:
    current = State(state) if state is not None else None
    target = TRANSITIONS.get((current, event))
    if target is None:
        raise IllegalTransition(
            f"Event {event.value} is not allowed in state {state}.", state=state
        )
    return target


async def _record(
    session: AsyncSession,
    run_id: uuid.UUID,
    from_state: str | None,
    to_state: State,
    event: Event,
    actor: str,
    reason: str | None,
) -> None:
    entry: dict[str, Any] = {
        "blocked_run_id": run_id,
        "from_state": from_state,
        "to_state": to_state.value,
        "event": event.value,
        "actor": actor,
        "reason": reason,
    }
    if outbox.notify_type_for(to_state.value) is None:
        await session.execute(insert(HistoryEntry).values(**entry))
    else:
        # The history row plus outbound notifications (run.blocked, run.failed, …) for the
        # account's subscribers, in one statement of this transaction: the outbox.
        await outbox.record_history_and_event(session, **entry)
    if from_state is not None:
        # A run's first state is news to nobody: streams and waits listen for ids they know.
        await notify(session, RUN_EVENTS_CHANNEL, str(run_id))
    metrics.TRANSITIONS.labels(from_state or "", to_state.value).inc()


async def open_episode(
    session: AsyncSession,
    *,
    account_id: uuid.UUID,
    run_id: str,
    agent_id: str | None,
    actor: str,
    reason: str,
) -> uuid.UUID | None:
    """Insert a blocked run in its first state; its id, or None if an episode is open already."""
    state = target_of(None, Event.BLOCKED)
    new_id = uuid.uuid4()
    stmt = (
        pg_insert(BlockedRun)
        .values(id=new_id, account_id=account_id, run_id=run_id, agent_id=agent_id, state=state)
        .on_conflict_do_nothing()
        .returning(BlockedRun.id)
    )
    created = (await session.execute(stmt)).scalar_one_or_none()
    if created is None:
        return None
    await _record(session, new_id, None, state, Event.BLOCKED, actor, reason)
    return new_id


async def transition(
    session: AsyncSession,
    run: BlockedRun,
    event: Event,
    *,
    actor: str,
    reason: str | None = None,
    **changes: Any,
) -> BlockedRun:
    """Move `run` by `event`: one guarded UPDATE plus a history row, or a 409."""
    target = target_of(run.state, event)
    stmt = (
        update(BlockedRun)
        .where(
            BlockedRun.id == run.id,
            BlockedRun.state == run.state,
            BlockedRun.version == run.version,
        )
        .values(
            state=target.value,
            version=BlockedRun.version + 1,
            updated_at=func.now(),
            state_changed_at=func.now(),
            **changes,
        )
        .returning(BlockedRun.id)
        .execution_options(synchronize_session=False)
    )
    if (await session.execute(stmt)).scalar_one_or_none() is None:
        current = await session.scalar(select(BlockedRun.state).where(BlockedRun.id == run.id))
        raise IllegalTransition(
            f"The run changed concurrently; it is now {current}.", state=current
        )
    if target in TERMINAL_STATES:
        # Nothing is left to do for this episode: an in-flight step loses its lease and its
        # outcome, and no further Mosaic call is made for it.
        await cancel_pending(session, run.id)
    await _record(session, run.id, run.state, target, event, actor, reason)
    await session.refresh(run)
    return run


async def update_fields(session: AsyncSession, run: BlockedRun, **changes: Any) -> BlockedRun:
    """Change a run's data without changing its state (still versioned, never `state`)."""
    if "state" in changes:
        raise ValueError("state changes go through transition()")
    stmt = (
        update(BlockedRun)
        .where(BlockedRun.id == run.id, BlockedRun.version == run.version)
        .values(version=BlockedRun.version + 1, updated_at=func.now(), **changes)
        .returning(BlockedRun.id)
        .execution_options(synchronize_session=False)
    )
    if (await session.execute(stmt)).scalar_one_or_none() is None:
        raise IllegalTransition("The run changed concurrently.", state=run.state)
    await notify(session, RUN_EVENTS_CHANNEL, str(run.id))
    await session.refresh(run)
    return run


# One batch of a set-based release: lock the runs in id order (the one lock order after the
# decision's row), move them, and write their history (and resume steps) in the same statement.
_RELEASE_SQL = """
WITH picked AS (
    SELECT id, state FROM blocked_runs
    WHERE account_id = CAST(:account_id AS uuid) AND state = ANY(CAST(:froms AS text[]))
    ORDER BY id = CAST(:acting_run AS uuid) DESC NULLS LAST, id
    LIMIT :limit
    FOR NO KEY UPDATE
), moved AS (
    UPDATE blocked_runs AS b
    SET state = CAST(:to_state AS text), version = b.version + 1, updated_at = now(),
        state_changed_at = now(),
        plan = d.plan, topup = d.topup, chosen_plan_id = d.chosen_plan_id,
        checkout_url = CASE WHEN CAST(:to_state AS text) = 'awaiting_checkout'
                            THEN d.checkout_url END,
        error_code = CAST(:error_code AS text), error_message = CAST(:error_message AS text)
    FROM picked, organization_decisions AS d
    WHERE b.id = picked.id AND d.account_id = b.account_id
    RETURNING b.id, picked.state AS from_state, b.account_id, b.run_id, b.agent_id, b.state,
              b.error_code, b.error_message
), history AS (
    INSERT INTO blocked_run_history (blocked_run_id, from_state, to_state, event, actor, reason)
    SELECT id, from_state, CAST(:to_state AS text), CAST(:event AS text),
           CASE WHEN id = CAST(:acting_run AS uuid) THEN CAST(:actor AS text) ELSE 'system' END,
           CAST(:reason AS text)
    FROM moved
), steps AS (
    INSERT INTO jobs (kind, account_id, blocked_run_id, give_up_at)
    SELECT CAST(:resume AS text), CAST(:account_id AS uuid), id,
           now() + make_interval(secs => CAST(:give_up AS double precision))
    FROM moved
    WHERE CAST(:to_state AS text) = 'resuming'
    ON CONFLICT DO NOTHING
), outbox AS (
    -- Outbound notifications of the moved runs (run.failed on a give-up), set-based too.
    {outbox}
)
SELECT from_state, count(*) AS moved FROM moved GROUP BY from_state
"""
_RELEASE = _RELEASE_SQL.format(outbox=outbox.RELEASE_CTE)


def release_targets(event: Event) -> dict[State, list[str]]:
    """Where `event` moves the runs waiting on a decision: target state -> source states."""
    targets: dict[State, list[str]] = {}
    for (source, on), target in TRANSITIONS.items():
        if on is event and source in DECIDING_STATES:
            targets.setdefault(target, []).append(source.value)
    return targets


async def release(
    session: AsyncSession,
    account_id: uuid.UUID,
    event: Event,
    *,
    actor: str,
    reason: str,
    limit: int,
    give_up_after_seconds: float,
    error_code: str | None = None,
    error_message: str | None = None,
    acting_run: uuid.UUID | None = None,
) -> int:
    """Move up to `limit` of the account's runs that `event` applies to; how many moved.

    Set-based: one statement per target state, whatever the number of runs, taking the decision
    data (plan, top-up, checkout) from the organization's row. A run moved into `resuming` gets
    its resume step in the same statement. The history names `actor` on the run a person acted
    through (`acting_run`); the others were moved by the system, on the organization's account.
    """
    moved = 0
    for target, sources in release_targets(event).items():
        binds = _release_binds(
            account_id,
            event,
            target,
            sources,
            limit - moved,
            actor=actor,
            reason=reason,
            give_up_after_seconds=give_up_after_seconds,
            error_code=error_code,
            error_message=error_message,
            acting_run=acting_run,
        )
        rows = await session.execute(text(_RELEASE), binds)
        for from_state, count in rows.all():
            metrics.TRANSITIONS.labels(from_state, target.value).inc(count)
            moved += count
        if moved >= limit:
            break
    if moved:
        await notify(session, RUN_EVENTS_CHANNEL, organization_key(account_id))
        await notify(session, JOBS_CHANNEL)
    return moved


_RELEASE_ON = compile_named(_RELEASE)


def _release_binds(
    account_id: uuid.UUID,
    event: Event,
    target: State,
    sources: list[str],
    limit: int,
    *,
    actor: str,
    reason: str,
    give_up_after_seconds: float,
    error_code: str | None,
    error_message: str | None,
    acting_run: uuid.UUID | None,
) -> dict[str, Any]:
    """The values of one `_RELEASE` statement (one target state), for either connection."""
    return {
        "account_id": account_id,
        "froms": sorted(sources),
        "limit": limit,
        "to_state": target.value,
        "event": event.value,
        "actor": actor,
        "acting_run": acting_run,
        "reason": reason,
        "error_code": error_code,
        "error_message": error_message,
        "resume": JobKind.RESUME.value,
        "give_up": give_up_after_seconds,
        "notify_type": outbox.notify_type_for(target.value),
    }


async def release_on(
    conn: asyncpg.Connection,
    account_id: uuid.UUID,
    event: Event,
    *,
    actor: str,
    reason: str,
    limit: int,
    give_up_after_seconds: float,
    error_code: str | None = None,
    error_message: str | None = None,
    acting_run: uuid.UUID | None = None,
    organization_announced: bool = False,
) -> int:
    """`release` on a plain asyncpg connection (`Database.raw()`), in the caller's transaction:
    the same statement per target state, and the same NOTIFYs (the organization's only if the
    caller has not sent it in this transaction already; the workers' only if a run moved into
    `resuming` or announced an outbound event, that is, if a job may have been recorded)."""
    wake_workers = False
    moved = 0
    for target, sources in release_targets(event).items():
        binds = _release_binds(
            account_id,
            event,
            target,
            sources,
            limit - moved,
            actor=actor,
            reason=reason,
            give_up_after_seconds=give_up_after_seconds,
            error_code=error_code,
            error_message=error_message,
            acting_run=acting_run,
        )
        wake_workers |= target is State.RESUMING or binds["notify_type"] is not None
        for from_state, count in await conn.fetch(_RELEASE_ON.sql, *_RELEASE_ON.args(binds)):
            metrics.TRANSITIONS.labels(from_state, target.value).inc(count)
            moved += count
        if moved >= limit:
            break
    if moved and (wake_workers or not organization_announced):
        await conn.execute(
            "SELECT pg_notify($1, $2) WHERE NOT $3 UNION ALL SELECT pg_notify($4, '') WHERE $5",
            RUN_EVENTS_CHANNEL,
            organization_key(account_id),
            organization_announced,
            JOBS_CHANNEL,
            wake_workers,
        )
    return moved


@dataclass(frozen=True)
class ResumeOutcome:
    """What one resume step learned from Mosaic, to be recorded with its batch."""

    job_id: int
    worker_id: str
    blocked_run_id: uuid.UUID
    event: Event
    reason: str
    error_code: str | None = None
    error_message: str | None = None


# A batch of resume outcomes in one statement, after its runs are locked (in id order, the run
# before its job as everywhere): close each job still ours (lease and status checked per job),
# move each closed job's run out of `resuming` with its history row and outbound event, and
# announce each run on the event stream. The same writes as `finish` plus `transition` per
# run, set-based like `release`. The closed resume job was its run's only pending job (one
# pending job per run, by a unique index), so moving it to a terminal state cancels nothing.
#
# Rows are found by primary key only, and their status and state checked once they are locked
# (the runs by the statement before, which returns their states; the jobs in `locked`). A
# `status = 'pending'` or `state = 'resuming'` condition in the scans let the planner, on
# statistics from before a release (when no run was resuming), walk every resuming run and
# every pending job once per batch: 200 ms per batch at 10,000 runs.
_FINISH_RESUMES = f"""
WITH outcome AS (
    SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[],
                         $6::text[], $7::text[], $8::text[])
        AS o(job_id, worker, event, to_state, reason, error_code, error_message, notify_type)
), locked AS MATERIALIZED (
    SELECT id, blocked_run_id, status, locked_by FROM jobs
    WHERE id = ANY($1::bigint[])
    ORDER BY id
    FOR NO KEY UPDATE
), done AS (
    UPDATE jobs AS j SET status = 'done', finished_at = now(), locked_until = NULL
    FROM locked AS l JOIN outcome AS o ON o.job_id = l.id
    WHERE j.id = l.id AND l.status = 'pending' AND l.locked_by = o.worker
    RETURNING j.id AS job_id, j.blocked_run_id, o.event, o.to_state, o.reason, o.error_code,
              o.error_message, o.notify_type
), moved AS (
    UPDATE blocked_runs AS r
    SET state = d.to_state, version = r.version + 1, updated_at = now(),
        state_changed_at = now(),
        error_code = COALESCE(d.error_code, r.error_code),
        error_message = COALESCE(d.error_message, r.error_message)
    FROM done AS d
    WHERE r.id = d.blocked_run_id AND r.id = ANY($10::uuid[])
    RETURNING r.id, CAST('resuming' AS text) AS from_state, r.account_id, r.run_id, r.agent_id,
              r.state, r.error_code, r.error_message, d.event, d.reason, d.notify_type
), history AS (
    INSERT INTO blocked_run_history (blocked_run_id, from_state, to_state, event, actor, reason)
    SELECT id, from_state, state, event, 'system', reason FROM moved
), deliveries AS (
    INSERT INTO notification_deliveries
        (subscription_id, account_id, message_id, event_type, ordering_key, payload)
    SELECT s.id, s.account_id, 'msg_' || replace(CAST(gen_random_uuid() AS text), '-', ''),
           b.notify_type, CAST(b.id AS text),
           {outbox.run_data_sql("b.notify_type", "b.event", "'system'", "b.reason")}
    FROM moved AS b
    JOIN subscriptions AS s ON s.account_id = b.account_id
    WHERE s.status = 'active' AND b.notify_type = ANY(s.event_types)
    RETURNING 1
)
SELECT d.job_id, m.state AS moved_to, (SELECT count(*) FROM deliveries) AS delivered,
       pg_notify($9, CAST(d.blocked_run_id AS text))
FROM done AS d LEFT JOIN moved AS m ON m.id = d.blocked_run_id
"""


async def finish_resumes(db: Database, outcomes: list[ResumeOutcome]) -> set[int]:
    """Record a batch of resume outcomes in one transaction; the ids of the jobs closed.

    A job not closed here was no longer ours (its lease ran out and another worker has it,
    or its run was cancelled): its outcome is dropped, as `finish` would refuse it.
    """
    if not outcomes:
        return set()
    columns: list[list[Any]] = [[] for _ in range(8)]
    for o in outcomes:
        target = target_of(State.RESUMING.value, o.event)
        # What the run's new state announces to subscribers comes from the outbox's own table.
        row = (
            o.job_id,
            o.worker_id,
            o.event.value,
            target.value,
            o.reason,
            o.error_code,
            o.error_message,
            outbox.notify_type_for(target.value),
        )
        for column, value in zip(columns, row, strict=True):
            column.append(value)
    runs = sorted({o.blocked_run_id for o in outcomes})
    async with db.raw() as conn:
        # The runs before their jobs, in id order: the one lock order (see `cancel`).
        locked = await conn.fetch(
            "SELECT id, state FROM blocked_runs WHERE id = ANY($1::uuid[])"
            " ORDER BY id FOR NO KEY UPDATE",
            runs,
        )
        resuming = [row["id"] for row in locked if row["state"] == State.RESUMING.value]
        rows = await conn.fetch(_FINISH_RESUMES, *columns, RUN_EVENTS_CHANNEL, resuming)
        if rows and rows[0]["delivered"]:
            await conn.execute("SELECT pg_notify($1, '')", JOBS_CHANNEL)
    for row in rows:
        if row["moved_to"] is not None:
            metrics.TRANSITIONS.labels(State.RESUMING.value, row["moved_to"]).inc()
    return {row["job_id"] for row in rows}
