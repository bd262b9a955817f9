"""Resuming: once, a 409 answered by re-reading the run, a bound on loops; and one decision
serving every blocked run of an organization."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from conftest import (
    Tenant,
    bearer,
    blocked_run_for,
    eventually,
    isolated_stack,
    make_tenant,
    mosaic_calls,
    sandbox_run,
    start_mosaic_run,
    wait_for_state,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def blocked_in(
    client: httpx.AsyncClient, mosaic: httpx.AsyncClient, tenant: Tenant, state: str
) -> tuple[str, dict]:
    run_id = await start_mosaic_run(mosaic, tenant)
    blocked = await blocked_run_for(client, tenant, run_id)
    return run_id, await wait_for_state(client, tenant, blocked["id"], state)


async def test_one_decision_moves_every_blocked_run_of_the_organization(
    client: httpx.AsyncClient, mosaic: httpx.AsyncClient
) -> None:
    tenant = await make_tenant(client, mosaic)
    runs = [await blocked_in(client, mosaic, tenant, "awaiting_choice") for _ in range(3)]
    (_, first), others = runs[0], runs[1:]

    chosen = await client.post(
        f"/v1/blocked-runs/{first['id']}/choose-plan",
        json={"plan_id": "creator"},
        headers=tenant.headers,
    )
    checkout_id = chosen.json()["checkout_url"].rstrip("/").rsplit("/", 1)[1]
    (await mosaic.post(f"/_sandbox/checkouts/{checkout_id}/complete")).raise_for_status()
    confirmed = await client.post(
        f"/v1/blocked-runs/{first['id']}/confirm-checkout", headers=tenant.headers
    )
    assert confirmed.json()["state"] == "topup_prompt"
    for _, other in others:
        moved = (await client.get(f"/v1/blocked-runs/{other['id']}", headers=tenant.headers)).json()
        assert moved["state"] == "topup_prompt"
        assert moved["plan"]["id"] == "creator"
        assert moved["history"][-1]["event"] == "checkout_confirmed"
        # The person acted through the first run; the organization's other runs moved with it.
        assert moved["history"][-1]["actor"] == "system"

    answered = await client.post(
        f"/v1/blocked-runs/{first['id']}/topup",
        json={"enable": True, "threshold": 500, "quantity": 5000},
        headers=tenant.headers,
    )
    assert answered.json()["state"] == "resumed"
    for run_id, other in others:
        done = await wait_for_state(client, tenant, other["id"], "resumed")
        assert done["topup"]["enabled"] is True
        assert (await sandbox_run(mosaic, run_id))["resumes"] == 1

    calls = await mosaic_calls(mosaic, tenant)
    assert calls.count(("POST", "/plan/upgrade")) == 1
    assert calls.count(("POST", "/credits/settings")) == 1
    for run_id, _ in runs:
        assert calls.count(("POST", f"/agent_run/{run_id}/resume")) == 1


async def test_resume_409_for_a_run_already_running_again_counts_as_resumed() -> None:
    # No webhooks reach unblock here, so nothing but its own resume step can learn that the
    # run was resumed behind its back: the resume is answered 409 and the run re-read.
    async with isolated_stack("resume_409_running") as stack:
        client, mosaic = stack.client, stack.mosaic
        tenant = await make_tenant(client, mosaic, plan_id="creator", balance=0)
        run_id = await start_mosaic_run(mosaic, tenant, report=False)
        registered = await client.post(
            "/v1/blocked-runs", json={"run_id": run_id}, headers=tenant.service_headers
        )
        blocked = await wait_for_state(client, tenant, registered.json()["id"], "topup_prompt")
        patch = {"balance": 100_000}
        (
            await mosaic.patch(f"/_sandbox/orgs/{tenant.organization_id}", json=patch)
        ).raise_for_status()
        direct = await mosaic.post(f"/agent_run/{run_id}/resume", headers=bearer(tenant.mosaic_key))
        assert direct.status_code == 200

        async def running_again() -> bool:
            return (await sandbox_run(mosaic, run_id))["status"] in ("running", "completed")

        await eventually(running_again, what="the run to run again in Mosaic")
        answer = await client.post(
            f"/v1/blocked-runs/{blocked['id']}/topup",
            json={"enable": False},
            headers=tenant.headers,
        )
        assert answer.status_code == 200, answer.text
        final = answer.json()
        assert final["state"] == "resumed"
        assert final["error"] is None
        calls = await mosaic_calls(mosaic, tenant)
        resume = ("POST", f"/agent_run/{run_id}/resume")
        assert calls.count(resume) == 2  # the direct one, then unblock's (409)
        assert calls.index(resume) < calls.index(("GET", f"/agent_run/{run_id}"))
        assert (await sandbox_run(mosaic, run_id))["resumes"] == 1


async def test_resume_409_for_a_run_still_failed_fails_with_a_reason_and_can_be_retried(
    client: httpx.AsyncClient, mosaic: httpx.AsyncClient
) -> None:
    tenant = await make_tenant(client, mosaic, plan_id="creator", balance=0)
    run_id, blocked = await blocked_in(client, mosaic, tenant, "topup_prompt")
    fault = {
        "method": "POST",
        "path": f"/agent_run/{run_id}/resume",
        "action": "status",
        "status": 409,
        "count": 1,
    }
    (await mosaic.post("/_sandbox/faults", json=fault)).raise_for_status()
    answer = await client.post(
        f"/v1/blocked-runs/{blocked['id']}/topup", json={"enable": False}, headers=tenant.headers
    )
    assert answer.status_code == 200
    failed = answer.json()
    assert failed["state"] == "failed"
    assert failed["error"]["code"] == "resume_refused"
    assert failed["actions"] == ["retry"]
    calls = await mosaic_calls(mosaic, tenant)
    assert calls[-2:] == [("POST", f"/agent_run/{run_id}/resume"), ("GET", f"/agent_run/{run_id}")]

    # Retrying waits on the organization's decision again; it was answered after this run
    # blocked, so the question is not asked again and the run resumes.
    retried = await client.post(f"/v1/blocked-runs/{blocked['id']}/retry", headers=tenant.headers)
    assert retried.status_code == 200
    assert retried.json()["state"] == "resumed"
    assert retried.json()["error"] is None
    events = [
        h["event"]
        for h in (
            await client.get(f"/v1/blocked-runs/{blocked['id']}", headers=tenant.headers)
        ).json()["history"]
    ]
    assert events[-3:] == ["retry", "org_topup_answered", "resume_accepted"]
    assert (await sandbox_run(mosaic, run_id))["resumes"] == 1


async def test_a_run_that_keeps_blocking_after_resumes_stops_failed_instead_of_looping(
    client: httpx.AsyncClient, mosaic: httpx.AsyncClient, service
) -> None:
    # Auto top-up is "on" but buys nothing: every resume blocks again at once.
    tenant = await make_tenant(client, mosaic, plan_id="creator", balance=0)
    settings = {"auto_topup": {"enabled": True, "threshold": 0, "quantity": 0}}
    (
        await mosaic.post("/credits/settings", headers=bearer(tenant.mosaic_key), json=settings)
    ).raise_for_status()
    run_id = await start_mosaic_run(mosaic, tenant)
    limit = service.runtime.settings.max_resumes

    async def episodes() -> list[dict] | None:
        page = await client.get(
            "/v1/blocked-runs", params={"run_id": run_id}, headers=tenant.headers
        )
        items = page.json()["items"]
        return items if items and items[0]["state"] == "failed" else None

    items = await eventually(episodes, timeout=20, what="the loop to be stopped")
    assert [i["state"] for i in items] == ["failed"] + ["resumed"] * limit
    assert items[0]["error"]["code"] == "resume_limit_reached"
    assert (await sandbox_run(mosaic, run_id))["resumes"] == limit
    calls = await mosaic_calls(mosaic, tenant)
    assert calls.count(("POST", f"/agent_run/{run_id}/resume")) == limit


async def test_cancel_stops_pending_work_and_frees_the_run_for_a_new_episode(
    client: httpx.AsyncClient, mosaic: httpx.AsyncClient
) -> None:
    tenant = await make_tenant(client, mosaic)
    run_id, blocked = await blocked_in(client, mosaic, tenant, "awaiting_choice")
    cancelled = await client.post(
        f"/v1/blocked-runs/{blocked['id']}/cancel", headers=tenant.headers
    )
    assert cancelled.status_code == 200
    assert cancelled.json()["state"] == "cancelled"
    assert cancelled.json()["actions"] == []
    again = await client.post(
        f"/v1/blocked-runs/{blocked['id']}/choose-plan",
        json={"plan_id": "creator"},
        headers=tenant.headers,
    )
    assert again.status_code == 409
    assert again.json()["state"] == "cancelled"
    # The run is still blocked in Mosaic: a service may register it again as a new episode.
    registered = await client.post(
        "/v1/blocked-runs", json={"run_id": run_id}, headers=tenant.service_headers
    )
    assert registered.status_code == 201
    assert registered.json()["id"] != blocked["id"]


async def test_a_person_action_while_a_step_is_pending_is_refused(
    client: httpx.AsyncClient, mosaic: httpx.AsyncClient
) -> None:
    tenant = await make_tenant(client, mosaic)
    _, blocked = await blocked_in(client, mosaic, tenant, "awaiting_choice")
    url = f"/v1/blocked-runs/{blocked['id']}/choose-plan"
    first, second = await asyncio.gather(
        client.post(url, json={"plan_id": "creator"}, headers=tenant.headers),
        client.post(url, json={"plan_id": "creator"}, headers=tenant.headers),
    )
    statuses = sorted([first.status_code, second.status_code])
    assert statuses == [200, 409]
    calls = await mosaic_calls(mosaic, tenant)
    assert calls.count(("POST", "/plan/upgrade")) == 1
