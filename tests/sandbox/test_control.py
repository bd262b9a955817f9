"""The /_sandbox control surface: organizations, call log, runs, reset."""

from __future__ import annotations

import pytest

from .harness import SandboxDriver
from .mosaic_shapes import Credits, PlanAnswer, StartedRun, expect

pytestmark = pytest.mark.asyncio


async def test_created_organization_state_is_readable(sandbox: SandboxDriver) -> None:
    org = await sandbox.org(
        plan_id="creator_annual",
        balance=1840,
        checkout=True,
        webhook_secret="s",
        name="Acme",
        nodes_per_run=3,
        node_cost=25,
        auto_topup={"enabled": True, "threshold": 100, "quantity": 500},
    )
    assert org.api_key.startswith("mk_")
    state = await sandbox.state(org)
    assert {k: state[k] for k in ("plan_id", "plan_family", "balance", "checkout")} == {
        "plan_id": "creator_annual",
        "plan_family": "creator",
        "balance": 1840,
        "checkout": True,
    }
    assert state["auto_topup"] == {
        "eligible": True,
        "enabled": True,
        "threshold": 100,
        "quantity": 500,
    }
    assert (state["nodes_per_run"], state["node_cost"], state["webhook_secret"]) == (3, 25, "s")
    assert state["runs"] == []
    assert state["checkouts"] == []
    plan = expect(await org.client.get("/plan"), PlanAnswer)
    assert plan.plan is not None
    assert plan.plan.id == "creator_annual"


async def test_patch_edits_state_without_side_effects(sandbox: SandboxDriver) -> None:
    org = await sandbox.org(balance=5)
    state = await sandbox.patch(org, plan_id="professional", balance=0)
    assert (state["plan_id"], state["balance"]) == ("professional", 0)
    state = await sandbox.patch(org, plan_id=None)
    assert state["plan_id"] is None
    credits = expect(await org.client.get("/credits"), Credits)
    assert credits.plan_id is None
    bad = await sandbox.control.patch(f"/_sandbox/orgs/{org.id}", json={"balance": None})
    assert bad.status_code == 422
    typo = await sandbox.control.patch(f"/_sandbox/orgs/{org.id}", json={"balanse": 1})
    assert typo.status_code == 422
    missing = await sandbox.control.get("/_sandbox/orgs/nope")
    assert (missing.status_code, missing.json()) == (404, {"detail": "Organization not found"})


async def test_chosen_api_key_must_be_unique_and_well_formed(sandbox: SandboxDriver) -> None:
    org = await sandbox.org(api_key="mk_demo_key")
    assert org.api_key == "mk_demo_key"
    again = await sandbox.control.post("/_sandbox/orgs", json={"api_key": "mk_demo_key"})
    assert again.status_code == 409
    wrong = await sandbox.control.post("/_sandbox/orgs", json={"api_key": "sk_nope"})
    assert wrong.status_code == 422
    unknown_plan = await sandbox.control.post("/_sandbox/orgs", json={"plan_id": "enterprise"})
    assert unknown_plan.status_code == 422


async def test_call_log_records_mosaic_calls_and_filters(sandbox: SandboxDriver) -> None:
    first = await sandbox.org(plan_id="creator")
    second = await sandbox.org()
    await first.client.get("/plan")
    await first.client.post("/credits/settings", json={"auto_topup": {"enabled": False}})
    await second.client.get("/whoami")
    await sandbox.client(None).get("/plan")
    await sandbox.control.get("/checkout/chk_none")

    calls = (await sandbox.control.get("/_sandbox/calls")).json()
    assert [(c["api_key"], c["method"], c["path"], c["status"]) for c in calls] == [
        (first.api_key, "GET", "/plan", 200),
        (first.api_key, "POST", "/credits/settings", 422),
        (second.api_key, "GET", "/whoami", 200),
        (None, "GET", "/plan", 401),
    ]
    assert calls[1]["body"] == {"auto_topup": {"enabled": False}}
    assert calls[0]["body"] is None
    assert calls[0]["time"].endswith("Z")

    by_key = await sandbox.control.get("/_sandbox/calls", params={"api_key": first.api_key})
    assert len(by_key.json()) == 2
    posts = await sandbox.control.get("/_sandbox/calls", params={"method": "post"})
    assert [c["path"] for c in posts.json()] == ["/credits/settings"]
    plans = await sandbox.control.get("/_sandbox/calls", params={"path": "/plan"})
    assert len(plans.json()) == 2
    assert (await sandbox.control.delete("/_sandbox/calls")).status_code == 204
    assert (await sandbox.control.get("/_sandbox/calls")).json() == []


async def test_runs_can_be_started_from_the_control_surface(sandbox: SandboxDriver) -> None:
    org = await sandbox.org(balance=0, nodes_per_run=2)
    response = await sandbox.control.post(
        "/_sandbox/runs", json={"organization_id": org.id, "agent_id": "agent-x"}
    )
    started = expect(response, StartedRun, 201)
    run = await sandbox.settled_run(org, started.run_id)
    assert (run["status"], run["needs_credits"], len(run["nodes"])) == ("failed", True, 2)
    state = await sandbox.state(org)
    assert [r["run_id"] for r in state["runs"]] == [started.run_id]
    assert (await sandbox.control.get("/_sandbox/calls")).json() == []


async def test_reset_forgets_everything_and_repeats_ids(sandbox: SandboxDriver) -> None:
    first = await sandbox.org()
    await sandbox.control.post("/_sandbox/faults", json={"path": "/plan", "action": "drop"})
    await first.client.get("/whoami")
    reset = await sandbox.control.post("/_sandbox/reset")
    assert reset.json() == {"reset": True, "seed": 0}
    assert (await sandbox.control.get("/_sandbox/orgs")).json() == []
    assert (await sandbox.control.get("/_sandbox/calls")).json() == []
    assert (await sandbox.control.get("/_sandbox/faults")).json() == []
    assert (await first.client.get("/whoami")).status_code == 401
    again = await sandbox.org()
    assert (again.id, again.api_key) == (first.id, first.api_key)
