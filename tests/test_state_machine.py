"""The declared table, legal and refused moves, and the guarded update behind every change."""

from __future__ import annotations

import itertools
import uuid

import httpx
import pytest
from sqlalchemy import func, select, update

from app.blocked_runs.models import BlockedRun, HistoryEntry
from app.blocked_runs.state_machine import (
    ACTIONS,
    ACTIVE_STATES,
    TERMINAL_STATES,
    TRANSITIONS,
    WAITING_STATES,
    Event,
    IllegalTransition,
    State,
    actions_for,
    target_of,
    transition,
)
from conftest import Service, Tenant

CHOOSING = (State.CHECKING_PLAN, State.AWAITING_CHOICE, State.AWAITING_CHECKOUT)
DECIDING = (*CHOOSING, State.TOPUP_PROMPT)
# The seed flow, in order, and the other legal paths, as (from, event, to). The decision's moves
# also apply to runs one move behind it (a large organization is released in batches).
EXPECTED = {
    (None, Event.BLOCKED, State.CHECKING_PLAN),
    (State.CHECKING_PLAN, Event.PLAN_FREE, State.AWAITING_CHOICE),
    (State.CHECKING_PLAN, Event.CHECKOUT_REQUIRED, State.AWAITING_CHECKOUT),
    (State.AWAITING_CHOICE, Event.CHECKOUT_REQUIRED, State.AWAITING_CHECKOUT),
    (State.AWAITING_CHECKOUT, Event.CHECKOUT_EXPIRED, State.AWAITING_CHOICE),
    *((s, Event.PLAN_PAID, State.TOPUP_PROMPT) for s in CHOOSING),
    *((s, Event.UPGRADED, State.TOPUP_PROMPT) for s in CHOOSING),
    *((s, Event.CHECKOUT_CONFIRMED, State.TOPUP_PROMPT) for s in CHOOSING),
    *((s, Event.PLAN_PAID_TOPUP_ON, State.RESUMING) for s in DECIDING),
    *((s, Event.TOPUP_ENABLED, State.RESUMING) for s in DECIDING),
    *((s, Event.TOPUP_DECLINED, State.RESUMING) for s in DECIDING),
    *((s, Event.ORG_TOPUP_ANSWERED, State.RESUMING) for s in DECIDING),
    (State.RESUMING, Event.RESUME_ACCEPTED, State.RESUMED),
    (State.RESUMING, Event.RESUME_REFUSED, State.FAILED),
    (State.RESUMING, Event.RESUME_LIMIT, State.FAILED),
    (State.FAILED, Event.RETRY, State.CHECKING_PLAN),
    *((s, Event.RUN_RESTARTED, State.RESUMED) for s in ACTIVE_STATES),
    *((s, Event.CANCEL, State.CANCELLED) for s in ACTIVE_STATES),
    *((s, Event.GIVE_UP, State.FAILED) for s in ACTIVE_STATES),
    *((s, Event.EXPIRE, State.EXPIRED) for s in WAITING_STATES),
}


def test_the_table_holds_exactly_the_designed_moves() -> None:
    assert {(f, e, t) for (f, e), t in TRANSITIONS.items()} == EXPECTED


@pytest.mark.parametrize(("state", "event"), list(itertools.product([None, *State], Event)))
def test_every_move_is_either_in_the_table_or_refused_naming_the_state(
    state: State | None, event: Event
) -> None:
    if (state, event) in TRANSITIONS:
        assert target_of(state, event) is TRANSITIONS[(state, event)]
    else:
        with pytest.raises(IllegalTransition) as refused:
            target_of(state, event)
        assert refused.value.status == 409
        assert refused.value.extra["state"] == state


def test_terminal_states_only_leave_by_retrying_a_failure() -> None:
    leaving = {(f, e) for (f, e) in TRANSITIONS if f in TERMINAL_STATES}
    assert leaving == {(State.FAILED, Event.RETRY)}


def test_actions_follow_the_state_and_only_cancel_while_a_step_is_pending() -> None:
    assert set(ACTIONS) == set(State)
    assert actions_for("awaiting_choice", pending=False) == ["choose_plan", "cancel"]
    assert actions_for("awaiting_choice", pending=True) == ["cancel"]
    assert actions_for("awaiting_checkout", pending=False) == [
        "confirm_checkout",
        "choose_plan",
        "cancel",
    ]
    assert actions_for("topup_prompt", pending=False) == ["topup", "cancel"]
    assert actions_for("topup_prompt", pending=True) == ["cancel"]
    assert actions_for("failed", pending=False) == ["retry"]
    for state in ("resumed", "cancelled", "expired"):
        assert actions_for(state, pending=False) == []


@pytest.mark.asyncio(loop_scope="session")
async def test_a_stale_version_is_refused_and_leaves_no_history(
    client: httpx.AsyncClient, service: Service, tenant: Tenant
) -> None:
    created = await client.post(
        "/v1/blocked-runs", json={"run_id": f"run-{uuid.uuid4()}"}, headers=tenant.service_headers
    )
    run_id = uuid.UUID(created.json()["id"])
    async with service.runtime.db.transaction() as session:
        run = await session.get_one(BlockedRun, run_id)
        # Another writer changes the row after we read it; our copy is now stale.
        await session.execute(
            update(BlockedRun)
            .where(BlockedRun.id == run_id)
            .values(version=BlockedRun.version + 1)
            .execution_options(synchronize_session=False)
        )
        with pytest.raises(IllegalTransition):
            await transition(session, run, Event.CANCEL, actor="test")
    async with service.runtime.db.sessions() as session:
        # The refused move left no entry (the service's worker may meanwhile have recorded the
        # run's own plan check: that is not this move's).
        count = await session.scalar(
            select(func.count()).where(
                HistoryEntry.blocked_run_id == run_id, HistoryEntry.event == Event.CANCEL.value
            )
        )
        assert count == 0
        current = await session.get_one(BlockedRun, run_id)
        assert current.state != "cancelled"


def test_the_open_episode_index_names_exactly_the_active_states() -> None:
    from app.blocked_runs.models import ACTIVE_STATES_SQL

    named = {s.strip(" '") for s in ACTIVE_STATES_SQL.strip("()").split(",")}
    assert named == {s.value for s in ACTIVE_STATES}


def test_the_deciding_states_and_decision_steps_named_in_sql_agree_with_the_code() -> None:
    from app.blocked_runs.models import (
        AWAITED_KINDS_SQL,
        DECIDING_STATES_SQL,
        DECISION_STEP_KINDS_SQL,
    )
    from app.blocked_runs.state_machine import DECIDING_STATES
    from app.work_queue import DECISION_STEPS, JobKind

    def named(sql: str) -> set[str]:
        return {s.strip(" '") for s in sql.strip("()").split(",")}

    assert named(DECIDING_STATES_SQL) == {s.value for s in DECIDING_STATES}
    assert named(DECISION_STEP_KINDS_SQL) == {k.value for k in DECISION_STEPS}
    assert named(AWAITED_KINDS_SQL) == {k.value for k in (*DECISION_STEPS, JobKind.RELEASE_RUNS)}
