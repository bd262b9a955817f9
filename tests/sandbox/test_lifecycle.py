"""The credit-blocked run, end to end, and the billing rules around it."""

from __future__ import annotations

import httpx
import pytest

from .harness import Inbox, SandboxDriver
from .mosaic_shapes import (
    AgentRun,
    CancelAnswer,
    CheckoutUpgrade,
    Credits,
    CreditSettingsAnswer,
    ImmediateUpgrade,
    PlanAnswer,
    PlanList,
    ResumeAnswer,
    RunFinishedEvent,
    RunNodes,
    RunStartedEvent,
    StartedRun,
    ValidationErrorBody,
    Whoami,
    event,
    expect,
    expect_error,
)

pytestmark = pytest.mark.asyncio

SECRET = "whsec-lifecycle"
SETTINGS = {"auto_topup": {"enabled": True, "threshold": 1000, "quantity": 5000}}


async def test_blocked_run_is_unblocked_by_checkout_topup_and_resume(
    sandbox: SandboxDriver, inbox: Inbox
) -> None:
    org = await sandbox.org(plan_id=None, balance=0, checkout=True, webhook_secret=SECRET)
    api = org.client

    started = expect(
        await api.post(
            "/agent/agent-1/run",
            json={
                "video_urls": ["https://example.com/in.mp4"],
                "callback_url": inbox.url,
                "ignore_nodes": [],
                "some_future_field": {"x": 1},
            },
        ),
        StartedRun,
    )
    assert started.status == "running"
    assert started.node_status_counts.in_progress == 4
    run_id = started.run_id

    first_pass = await inbox.until_finished()
    assert all(w.signature == SECRET for w in first_pass)
    opening = event(first_pass[0].payload)
    assert isinstance(opening, RunStartedEvent)
    assert opening.run_id == run_id
    assert opening.inputs[0].video_url == "https://example.com/in.mp4"
    finished = event(first_pass[-1].payload)
    assert isinstance(finished, RunFinishedEvent)
    assert (finished.status, finished.needs_credits) == ("failed", True)
    assert finished.status_message == "Insufficient credits"
    assert finished.errors[0].messages == ["Insufficient credits"]

    run = expect(await api.get(f"/agent_run/{run_id}"), AgentRun)
    assert (run.status, run.needs_credits, run.status_message) == (
        "failed",
        True,
        "Insufficient credits",
    )
    nodes = expect(await api.get(f"/agent_run/{run_id}/nodes"), RunNodes)
    blocked = [node for node in nodes.nodes if node.needs_credits]
    assert [(n.status, n.status_message) for n in blocked] == [("failed", "Insufficient credits")]
    assert run.errors[0].original_node_id == blocked[0].original_node_id

    plan = expect(await api.get("/plan"), PlanAnswer)
    assert plan.plan is None
    assert plan.scheduled_plan is None
    catalogue = expect(await api.get("/plan/list"), PlanList)
    assert [p.id for p in catalogue.plans] == [
        "creator",
        "creator_annual",
        "professional",
        "professional_annual",
    ]

    upgrade = expect(await api.post("/plan/upgrade", json={"plan_id": "creator"}), CheckoutUpgrade)
    assert upgrade.checkout_url.startswith(f"{sandbox.url}/checkout/")
    async with httpx.AsyncClient() as browser:
        page = await browser.get(upgrade.checkout_url)
        assert page.status_code == 200
        assert "creator" in page.text
        assert "$50.00" in page.text
        paid = await browser.post(f"{upgrade.checkout_url}/pay")
        assert paid.status_code == 303
        done = await browser.get(httpx.URL(upgrade.checkout_url).join(paid.headers["location"]))
        assert "Payment complete" in done.text

    plan = expect(await api.get("/plan"), PlanAnswer)
    assert plan.plan is not None
    assert (plan.plan.id, plan.plan.family, plan.plan.status) == ("creator", "creator", "active")
    assert plan.credits.balance == 2500

    settings = expect(await api.post("/credits/settings", json=SETTINGS), CreditSettingsAnswer)
    assert settings.model_dump() == SETTINGS

    resumed = expect(await api.post(f"/agent_run/{run_id}/resume"), ResumeAnswer)
    assert resumed.run_id == resumed.agent_state_id == run_id
    assert resumed.nodes_queued == resumed.requeued_nodes == 4

    second_pass = await inbox.until_finished()
    assert isinstance(event(second_pass[0].payload), RunStartedEvent)
    finished = event(second_pass[-1].payload)
    assert isinstance(finished, RunFinishedEvent)
    assert (finished.status, finished.needs_credits, finished.errors) == ("completed", False, [])
    assert len(finished.outputs) == 1

    run = expect(await api.get(f"/agent_run/{run_id}"), AgentRun)
    assert (run.status, run.needs_credits) == ("completed", False)
    assert run.node_status_counts.model_dump() == {"completed": 4, "in_progress": 0, "failed": 0}
    credits = expect(await api.get("/credits"), Credits)
    assert credits.balance == 2500 - 4 * 100

    expect_error(await api.post(f"/agent_run/{run_id}/resume"), 409)


async def test_credit_settings_are_refused_without_an_eligible_plan(
    sandbox: SandboxDriver,
) -> None:
    free = await sandbox.org()
    pro = await sandbox.org(plan_id="pro")
    for org in (free, pro):
        expect_error(await org.client.post("/credits/settings", json=SETTINGS), 403)
        credits = expect(await org.client.get("/credits"), Credits)
        assert credits.auto_topup.model_dump() == {
            "eligible": False,
            "enabled": False,
            "threshold": 0,
            "quantity": 0,
        }


@pytest.mark.parametrize(
    "body",
    [
        {"auto_topup": {"enabled": True, "threshold": 1_000_001, "quantity": 10}},
        {"auto_topup": {"enabled": True, "threshold": 10, "quantity": -1}},
        {"auto_topup": {"enabled": True, "threshold": 10}},
        {"auto_topup": {"enabled": "yes", "threshold": 10, "quantity": 10}},
        {"auto_topup": {"enabled": True, "threshold": "10", "quantity": 10}},
        {},
    ],
    ids=[
        "threshold-too-big",
        "negative-quantity",
        "missing-quantity",
        "bool-as-text",
        "number-as-text",
        "empty",
    ],
)
async def test_bad_credit_settings_are_422(sandbox: SandboxDriver, body: dict[str, object]) -> None:
    org = await sandbox.org(plan_id="professional")
    expect(await org.client.post("/credits/settings", json=body), ValidationErrorBody, 422)


async def test_credit_settings_accept_the_range_bounds(sandbox: SandboxDriver) -> None:
    org = await sandbox.org(plan_id="creator_annual", balance=10)
    bounds = {"auto_topup": {"enabled": False, "threshold": 0, "quantity": 1_000_000}}
    answer = expect(await org.client.post("/credits/settings", json=bounds), CreditSettingsAnswer)
    assert answer.model_dump() == bounds


async def test_immediate_upgrade_switches_plan_and_adds_its_credits(sandbox: SandboxDriver) -> None:
    org = await sandbox.org(balance=7, checkout=False)
    answer = expect(
        await org.client.post("/plan/upgrade", json={"plan_id": "professional_annual"}),
        ImmediateUpgrade,
    )
    assert answer.model_dump() == {
        "success": True,
        "requires_checkout": False,
        "plan_id": "professional_annual",
        "plan_family": "professional",
    }
    plan = expect(await org.client.get("/plan"), PlanAnswer)
    assert plan.plan is not None
    assert plan.plan.id == "professional_annual"
    assert plan.credits.balance == 10_007
    credits = expect(await org.client.get("/credits"), Credits)
    assert (credits.plan, credits.plan_id, credits.auto_topup.eligible) == (
        "professional",
        "professional_annual",
        True,
    )
    assert credits.billing_cycle.current_period_start is not None


async def test_pro_is_purchasable_though_not_listed(sandbox: SandboxDriver) -> None:
    org = await sandbox.org()
    answer = expect(
        await org.client.post("/plan/upgrade", json={"plan_id": "pro"}), ImmediateUpgrade
    )
    assert answer.plan_family == "professional"


@pytest.mark.parametrize("plan_id", ["enterprise", "free", "creator_monthly", ""])
async def test_unknown_or_unpurchasable_plan_is_400(sandbox: SandboxDriver, plan_id: str) -> None:
    org = await sandbox.org()
    expect_error(await org.client.post("/plan/upgrade", json={"plan_id": plan_id}), 400)
    assert (await sandbox.state(org))["plan_id"] is None


async def test_upgrade_to_the_current_plan_is_409(sandbox: SandboxDriver) -> None:
    org = await sandbox.org(plan_id="creator")
    expect_error(await org.client.post("/plan/upgrade", json={"plan_id": "creator"}), 409)


async def test_upgrade_without_plan_id_is_422(sandbox: SandboxDriver) -> None:
    org = await sandbox.org()
    expect(await org.client.post("/plan/upgrade", json={}), ValidationErrorBody, 422)


async def test_checkout_redirects_to_the_callers_urls(sandbox: SandboxDriver) -> None:
    org = await sandbox.org(checkout=True)
    urls = {"success_url": "https://app.example/paid", "cancel_url": "https://app.example/back"}
    first = expect(
        await org.client.post("/plan/upgrade", json={"plan_id": "creator", **urls}),
        CheckoutUpgrade,
    )
    second = expect(
        await org.client.post("/plan/upgrade", json={"plan_id": "professional", **urls}),
        CheckoutUpgrade,
    )
    async with httpx.AsyncClient() as browser:
        cancelled = await browser.post(f"{second.checkout_url}/cancel")
        assert (cancelled.status_code, cancelled.headers["location"]) == (303, urls["cancel_url"])
        paid = await browser.post(f"{first.checkout_url}/pay")
        assert (paid.status_code, paid.headers["location"]) == (303, urls["success_url"])
        again = await browser.post(f"{first.checkout_url}/pay")
        assert again.status_code == 409
        closed = await browser.post(f"{second.checkout_url}/pay")
        assert closed.status_code == 409
        missing = await browser.get(f"{sandbox.url}/checkout/chk_nope")
        assert missing.status_code == 404
    state = await sandbox.state(org)
    assert (state["plan_id"], state["balance"]) == ("creator", 2500)


async def test_a_checkout_completes_once(sandbox: SandboxDriver) -> None:
    org = await sandbox.org(checkout=True)
    upgrade = expect(
        await org.client.post("/plan/upgrade", json={"plan_id": "professional"}), CheckoutUpgrade
    )
    checkout_id = upgrade.checkout_url.rsplit("/", 1)[-1]
    assert (await sandbox.state(org))["plan_id"] is None
    completed = await sandbox.control.post(f"/_sandbox/checkouts/{checkout_id}/complete")
    assert completed.json()["status"] == "paid"
    expect_error(await sandbox.control.post(f"/_sandbox/checkouts/{checkout_id}/complete"), 409)
    state = await sandbox.state(org)
    assert (state["plan_id"], state["balance"]) == ("professional", 10_000)


async def test_cancel_stops_a_running_run_and_resume_finishes_it(
    sandbox: SandboxDriver, inbox: Inbox
) -> None:
    # Fifty nodes take half a second: ample time to cancel midway.
    org = await sandbox.org(plan_id="creator", balance=0, node_cost=0, nodes_per_run=50)
    run_id = await sandbox.start_run(org, inbox.url)
    progress = await inbox.next()
    while progress.payload["node_status_counts"]["completed"] < 2:
        progress = await inbox.next()

    cancelled = expect(await org.client.post(f"/agent_run/{run_id}/cancel"), CancelAnswer)
    assert cancelled.success
    assert cancelled.message == "Agent run cancelled successfully"
    run = expect(await org.client.get(f"/agent_run/{run_id}"), AgentRun)
    assert run.status == "cancelled"
    expect_error(await org.client.post(f"/agent_run/{run_id}/cancel"), 409)

    resumed = expect(await org.client.post(f"/agent_run/{run_id}/resume"), ResumeAnswer)
    assert resumed.nodes_queued == cancelled.nodes_reset
    assert 0 < resumed.nodes_queued < 50
    events = await inbox.until_finished()
    flags = [w.payload["flag"] for w in events]
    # No RUN_FINISHED for the cancellation itself, then the resume's RUN_STARTED.
    assert flags.count("RUN_STARTED") == 1
    assert flags.count("RUN_FINISHED") == 1
    assert events[-1].payload["status"] == "completed"


async def test_resume_is_409_while_running(sandbox: SandboxDriver, inbox: Inbox) -> None:
    org = await sandbox.org(balance=1000)
    run_id = await sandbox.start_run(org, inbox.url)
    detail = expect_error(await org.client.post(f"/agent_run/{run_id}/resume"), 409)
    assert "running" in detail
    await inbox.until_finished()
    run = expect(await org.client.get(f"/agent_run/{run_id}"), AgentRun)
    assert run.status == "completed"
    expect_error(await org.client.post(f"/agent_run/{run_id}/resume"), 409)


async def test_resume_without_credits_blocks_again(sandbox: SandboxDriver, inbox: Inbox) -> None:
    org = await sandbox.org(balance=150)
    run_id = await sandbox.start_run(org, inbox.url)
    first = await inbox.until_finished()
    assert first[-1].payload["node_status_counts"] == {
        "completed": 1,
        "in_progress": 0,
        "failed": 1,
    }
    resumed = expect(await org.client.post(f"/agent_run/{run_id}/resume"), ResumeAnswer)
    assert (resumed.nodes_queued, resumed.nodes_considered) == (3, 4)
    again = await inbox.until_finished()
    assert again[0].payload["flag"] == "RUN_STARTED"
    finished = event(again[-1].payload)
    assert isinstance(finished, RunFinishedEvent)
    assert (finished.status, finished.needs_credits) == ("failed", True)


async def test_runs_of_another_organization_are_404(sandbox: SandboxDriver) -> None:
    owner = await sandbox.org(balance=0)
    stranger = await sandbox.org(balance=0)
    run_id = await sandbox.start_run(owner)
    for method, path in [
        ("GET", f"/agent_run/{run_id}"),
        ("GET", f"/agent_run/{run_id}/nodes"),
        ("POST", f"/agent_run/{run_id}/resume"),
        ("POST", f"/agent_run/{run_id}/cancel"),
        ("GET", "/agent_run/no-such-run"),
    ]:
        expect_error(await stranger.client.request(method, path), 404)


@pytest.mark.parametrize(
    "authorization", [None, "Bearer mk_unknown", "Bearer", "Basic bWtfeDp5", "mk_raw"]
)
async def test_missing_or_unknown_key_is_401(
    sandbox: SandboxDriver, authorization: str | None
) -> None:
    await sandbox.org()
    headers = {} if authorization is None else {"Authorization": authorization}
    client = sandbox.client(None)
    for method, path in [("GET", "/whoami"), ("GET", "/plan"), ("POST", "/agent/a/run")]:
        response = await client.request(method, path, headers=headers)
        expect_error(response, 401)


async def test_whoami_names_the_organization(sandbox: SandboxDriver) -> None:
    org = await sandbox.org(name="Acme Productions")
    who = expect(await org.client.get("/whoami"), Whoami)
    assert (who.organization_id, who.organization_name, who.organization_slug) == (
        org.id,
        "Acme Productions",
        "acme-productions",
    )
    assert who.last_used_at is not None


async def test_free_organization_credits_are_all_null_and_off(sandbox: SandboxDriver) -> None:
    org = await sandbox.org(balance=42)
    credits = expect(await org.client.get("/credits"), Credits)
    assert credits.model_dump() == {
        "organization_id": org.id,
        "balance": 42,
        "plan": None,
        "plan_id": None,
        "billing_cycle": {"current_period_start": None, "current_period_end": None},
        "auto_topup": {"eligible": False, "enabled": False, "threshold": 0, "quantity": 0},
    }


async def test_plan_list_has_the_documented_prices(sandbox: SandboxDriver) -> None:
    org = await sandbox.org()
    plans = expect(await org.client.get("/plan/list"), PlanList)
    assert {p.id: (p.billing, p.price_usd, p.credits_per_month) for p in plans.plans} == {
        "creator": ("monthly", 50, 2500),
        "creator_annual": ("annual", 480, 2500),
        "professional": ("monthly", 150, 10000),
        "professional_annual": ("annual", 1500, 10000),
    }
    assert {p.top_up_rate_per_100_credits_usd for p in plans.plans} == {2, 1.6}


async def test_enabling_auto_topup_below_threshold_buys_at_once(sandbox: SandboxDriver) -> None:
    org = await sandbox.org(plan_id="creator", balance=200)
    expect(await org.client.post("/credits/settings", json=SETTINGS), CreditSettingsAnswer)
    credits = expect(await org.client.get("/credits"), Credits)
    assert credits.balance == 5200
    assert credits.auto_topup.model_dump() == {"eligible": True, **SETTINGS["auto_topup"]}
    topups = (await sandbox.state(org))["topups"]
    assert [(t["quantity"], t["reason"]) for t in topups] == [(5000, "enabled_below_threshold")]


async def test_auto_topup_fires_when_a_node_leaves_the_balance_below_threshold(
    sandbox: SandboxDriver, inbox: Inbox
) -> None:
    org = await sandbox.org(plan_id="creator", balance=1150)
    expect(await org.client.post("/credits/settings", json=SETTINGS), CreditSettingsAnswer)
    assert (await sandbox.state(org))["topups"] == []
    await sandbox.start_run(org, inbox.url)
    events = await inbox.until_finished()
    assert events[-1].payload["status"] == "completed"
    state = await sandbox.state(org)
    # 1150 → 1050 (no top-up) → 950 (top-up to 5950) → 5850 → 5750.
    assert [t["reason"] for t in state["topups"]] == ["below_threshold"]
    assert state["balance"] == 5750


async def test_auto_topup_rescues_a_node_that_would_fail(
    sandbox: SandboxDriver, inbox: Inbox
) -> None:
    org = await sandbox.org(
        plan_id="professional",
        balance=50,
        auto_topup={"enabled": True, "threshold": 0, "quantity": 300},
    )
    await sandbox.start_run(org, inbox.url)
    events = await inbox.until_finished()
    assert events[-1].payload["status"] == "completed"
    state = await sandbox.state(org)
    assert [t["reason"] for t in state["topups"]] == ["insufficient_for_node"] * 2
    assert state["balance"] == 50 + 600 - 400


async def test_auto_topup_too_small_still_fails_for_credits(
    sandbox: SandboxDriver, inbox: Inbox
) -> None:
    org = await sandbox.org(
        plan_id="creator", balance=0, auto_topup={"enabled": True, "threshold": 0, "quantity": 40}
    )
    await sandbox.start_run(org, inbox.url)
    events = await inbox.until_finished()
    assert events[-1].payload["needs_credits"] is True
    assert (await sandbox.state(org))["balance"] == 40


async def test_pro_plan_never_tops_up(sandbox: SandboxDriver, inbox: Inbox) -> None:
    org = await sandbox.org(
        plan_id="pro", balance=0, auto_topup={"enabled": True, "threshold": 10, "quantity": 500}
    )
    await sandbox.start_run(org, inbox.url)
    events = await inbox.until_finished()
    assert events[-1].payload["needs_credits"] is True
    assert (await sandbox.state(org))["topups"] == []
