"""The organization's decision: its declared table, and how the runs waiting on it follow it."""

from __future__ import annotations

import itertools

import pytest

from app.blocked_runs.state_machine import DECIDING_STATES, Event, IllegalTransition, State
from app.blocked_runs.state_machine import TRANSITIONS as RUN_TRANSITIONS
from app.organizations.service import _JOIN_EVENT
from app.organizations.state_machine import (
    RUN_STATE_FOR,
    TRANSITIONS,
    DecisionState,
    actions_for,
    target_of,
)

D = DecisionState
CHOOSING = (D.CHECKING_PLAN, D.AWAITING_CHOICE, D.AWAITING_CHECKOUT)
OPEN = (*CHOOSING, D.TOPUP_PROMPT)
EXPECTED = {
    (D.IDLE, Event.BLOCKED, D.CHECKING_PLAN),
    (D.DECIDED, Event.BLOCKED, D.CHECKING_PLAN),
    (D.CHECKING_PLAN, Event.PLAN_FREE, D.AWAITING_CHOICE),
    *((s, Event.PLAN_PAID, D.TOPUP_PROMPT) for s in CHOOSING),
    *((s, Event.PLAN_PAID_TOPUP_ON, D.DECIDED) for s in CHOOSING),
    (D.AWAITING_CHOICE, Event.UPGRADED, D.TOPUP_PROMPT),
    (D.AWAITING_CHECKOUT, Event.UPGRADED, D.TOPUP_PROMPT),
    (D.AWAITING_CHOICE, Event.CHECKOUT_REQUIRED, D.AWAITING_CHECKOUT),
    (D.AWAITING_CHECKOUT, Event.CHECKOUT_REQUIRED, D.AWAITING_CHECKOUT),
    (D.AWAITING_CHECKOUT, Event.CHECKOUT_CONFIRMED, D.TOPUP_PROMPT),
    (D.AWAITING_CHECKOUT, Event.CHECKOUT_EXPIRED, D.AWAITING_CHOICE),
    (D.TOPUP_PROMPT, Event.TOPUP_ENABLED, D.DECIDED),
    (D.TOPUP_PROMPT, Event.TOPUP_DECLINED, D.DECIDED),
    *((s, Event.GIVE_UP, D.IDLE) for s in OPEN),
}


def test_the_decision_table_holds_exactly_the_designed_moves() -> None:
    assert {(f, e, t) for (f, e), t in TRANSITIONS.items()} == EXPECTED


@pytest.mark.parametrize(("state", "event"), list(itertools.product(DecisionState, Event)))
def test_every_decision_move_is_in_the_table_or_refused_naming_the_state(
    state: DecisionState, event: Event
) -> None:
    if (state, event) in TRANSITIONS:
        assert target_of(state, event) is TRANSITIONS[(state, event)]
    else:
        with pytest.raises(IllegalTransition) as refused:
            target_of(state, event)
        assert refused.value.status == 409


def test_every_move_of_the_decision_brings_its_waiting_runs_where_the_decision_now_is() -> None:
    # A run waiting in the state that mirrors the decision's source state is moved by the same
    # event to the state that mirrors the decision's target (a failure fails the run).
    for (source, event), target in TRANSITIONS.items():
        if event is Event.BLOCKED:
            continue  # a new round: the runs that wait are the new ones, in checking_plan
        run_source = RUN_STATE_FOR[source]
        expected = State.FAILED if event is Event.GIVE_UP else RUN_STATE_FOR[target]
        if run_source is None or run_source is expected:
            continue
        assert RUN_TRANSITIONS.get((run_source, event)) is expected, (source, event)


def test_a_run_joining_a_decision_lands_where_the_decision_is() -> None:
    for state, event in _JOIN_EVENT.items():
        assert RUN_TRANSITIONS[(State.CHECKING_PLAN, event)] is RUN_STATE_FOR[state]
    assert set(_JOIN_EVENT) == {s for s in DecisionState if s not in (D.IDLE, D.CHECKING_PLAN)}
    assert {RUN_STATE_FOR[s] for s in OPEN} == set(DECIDING_STATES)


def test_a_decision_offers_actions_only_while_no_step_is_under_way() -> None:
    assert actions_for("awaiting_choice", pending=False) == ["choose_plan"]
    assert actions_for("awaiting_checkout", pending=False) == ["confirm_checkout", "choose_plan"]
    assert actions_for("topup_prompt", pending=False) == ["topup"]
    assert actions_for("topup_prompt", pending=True) == []
    for state in ("idle", "checking_plan", "decided"):
        assert actions_for(state, pending=False) == []
