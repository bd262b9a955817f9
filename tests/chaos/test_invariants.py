"""The chaos suite's checks fail on the defects they are there to catch (synthetic evidence)."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from typing import Any

from bench.chaos.flows import Kind, Org
from bench.chaos.gateway import ServerError
from bench.chaos.invariants import Observed, check_all

KEY, ACCOUNT, RUN, EPISODE = "mk_a", "acc-1", "run-1", "ep-1"


def _call(path: str, status: int | None, fault: str | None = None, applied: int | None = None):
    return {"api_key": KEY, "method": "POST", "path": path, "status": status, "fault": fault,
            "applied_status": applied, "time": "2026-01-01T00:00:00.000Z"}  # fmt: skip


def _history(*states: str, actor: str = "system") -> list[dict[str, Any]]:
    now = datetime.now(UTC)
    rows, before = [], None
    for state in states:
        rows.append({"from_state": before, "to_state": state, "actor": actor, "created_at": now})
        before = state
    return rows


def _healthy() -> Observed:
    """A free organization with an immediate upgrade, one run, everything as it should be."""
    org = Org(0, Kind.FREE_IMMEDIATE, 1, True, "org-1", KEY, ACCOUNT, run_ids=[RUN])
    org.answers = Counter({"choose_plan": 1, "topup": 1})
    org.enable_answers = 1
    history = _history("checking_plan", "awaiting_choice", "topup_prompt", "resuming", "resumed")
    history[2]["actor"] = history[3]["actor"] = "user:person-0"
    return Observed(
        orgs=[org],
        sandbox_orgs={"org-1": {"runs": [{"run_id": RUN, "status": "completed", "resumes": 1}]}},
        calls=[
            _call("/plan/upgrade", 200),
            _call("/credits/settings", 200),
            _call(f"/agent_run/{RUN}/resume", 200),
        ],
        episodes=[
            {
                "id": EPISODE,
                "account_id": ACCOUNT,
                "run_id": RUN,
                "state": "resumed",
                "error_code": None,
            }
        ],
        history={EPISODE: history},
        pending_jobs=0,
        server_errors=[],
        outages=[(100.0, 110.0)],
        lost_webhooks=[],
    )


def _failed(seen: Observed) -> set[str]:
    return {check.name for check in check_all(seen) if not check.passed}


def test_a_healthy_run_passes_every_check() -> None:
    assert _failed(_healthy()) == set()


def test_a_lost_answer_that_bought_counts_as_a_purchase() -> None:
    seen = _healthy()
    # The first upgrade was applied but answered 502; the retry bought again.
    seen.calls.insert(0, _call("/plan/upgrade", 502, "status", applied=200))
    assert _failed(seen) == {"at most one purchase per organization decision"}


def test_a_faulted_call_that_never_reached_mosaic_is_not_a_purchase() -> None:
    seen = _healthy()
    seen.calls.insert(0, _call("/plan/upgrade", 503, "status"))
    assert _failed(seen) == set()


def test_settings_written_twice_for_one_answer_fails() -> None:
    seen = _healthy()
    seen.calls.insert(1, _call("/credits/settings", None, "drop", applied=200))
    assert _failed(seen) == {"at most one settings write per answer"}


def test_a_second_episode_after_the_resume_fails() -> None:
    seen = _healthy()
    seen.episodes.append(
        {"id": "ep-2", "account_id": ACCOUNT, "run_id": RUN, "state": "resumed",
         "error_code": None}
    )  # fmt: skip
    seen.history["ep-2"] = _history("checking_plan", "resumed")
    failed = _failed(seen)
    assert "exactly one episode per block" in failed
    assert "exactly one successful resume per episode" in failed


def test_an_episode_closed_without_a_resume_fails() -> None:
    seen = _healthy()
    seen.sandbox_orgs["org-1"]["runs"][0].update(status="failed", resumes=0)
    seen.calls.pop()
    seen.history[EPISODE] = _history("checking_plan", "awaiting_choice", "resumed")
    failed = _failed(seen)
    assert "every run reaches the terminal state its path implies (resumed, completed)" in failed
    assert "exactly one successful resume per episode" in failed


def test_a_question_answered_twice_fails() -> None:
    seen = _healthy()
    seen.orgs[0].answers["topup"] = 2
    assert _failed(seen) == {"no question asked twice"}


def test_5xx_only_counts_outside_the_outage() -> None:
    seen = _healthy()
    seen.server_errors.append(ServerError(105.0, 500, "GET", "/v1/blocked-runs"))
    assert _failed(seen) == set()
    seen.server_errors.append(ServerError(120.0, 500, "GET", "/v1/blocked-runs"))
    assert _failed(seen) == {"no API 5xx outside the database outage"}


def test_a_broken_history_chain_fails() -> None:
    seen = _healthy()
    seen.history[EPISODE].pop(2)
    assert _failed(seen) == {"history chains valid"}


def test_a_stuck_episode_and_a_pending_step_fail() -> None:
    seen = _healthy()
    seen.episodes[0]["state"] = "resuming"
    seen.pending_jobs = 1
    assert "no run stuck" in _failed(seen)


def _checkout_org(*statuses: str) -> Observed:
    seen = _healthy()
    seen.orgs[0].kind = Kind.FREE_CHECKOUT
    seen.calls[0:1] = [_call("/plan/upgrade", 200) for _ in statuses]
    seen.sandbox_orgs["org-1"]["checkouts"] = [{"status": status} for status in statuses]
    return seen


def test_a_second_paid_checkout_is_a_second_purchase() -> None:
    assert _failed(_checkout_org("paid", "paid")) == {
        "at most one purchase per organization decision"
    }


def test_an_extra_checkout_nobody_paid_is_shown_not_failed() -> None:
    seen = _checkout_org("open", "paid")
    assert _failed(seen) == set()
    (check,) = [c for c in check_all(seen) if c.name.startswith("at most one purchase")]
    assert "1 extra checkouts opened" in check.figure
