"""Every path of the flow, end to end: sandbox webhooks in, Mosaic calls out, over real HTTP."""

from __future__ import annotations

import httpx
import pytest

from conftest import (
    Tenant,
    bearer,
    blocked_run_for,
    eventually,
    make_tenant,
    mosaic_calls,
    sandbox_run,
    start_mosaic_run,
    wait_for_state,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_free_organization_walks_checkout_and_topup_to_a_completed_run(
    client: httpx.AsyncClient, mosaic: httpx.AsyncClient, tenant: Tenant
) -> None:
    run_id = await start_mosaic_run(mosaic, tenant)
    blocked = await blocked_run_for(client, tenant, run_id)
    blocked = await wait_for_state(client, tenant, blocked["id"], "awaiting_choice")
    assert blocked["actions"] == ["choose_plan", "cancel"]
    assert blocked["plan"] is None
    offered = [p["id"] for p in blocked["plans"]]
    assert "creator" in offered
    assert blocked["agent_id"] == "agent-1"

    chosen = await client.post(
        f"/v1/blocked-runs/{blocked['id']}/choose-plan",
        json={"plan_id": "creator"},
        headers=tenant.headers,
    )
    assert chosen.status_code == 200, chosen.text
    body = chosen.json()
    assert body["state"] == "awaiting_checkout"
    assert body["chosen_plan_id"] == "creator"
    checkout_url = body["checkout_url"]
    assert checkout_url.startswith("http")

    # Confirming before paying: Mosaic still shows no paid plan, so the run waits.
    early = await client.post(
        f"/v1/blocked-runs/{blocked['id']}/confirm-checkout", headers=tenant.headers
    )
    assert early.status_code == 200
    assert early.json()["state"] == "awaiting_checkout"
    assert early.json()["error"]["code"] == "checkout_incomplete"

    checkout_id = checkout_url.rstrip("/").rsplit("/", 1)[1]
    (await mosaic.post(f"/_sandbox/checkouts/{checkout_id}/complete")).raise_for_status()
    confirmed = await client.post(
        f"/v1/blocked-runs/{blocked['id']}/confirm-checkout", headers=tenant.headers
    )
    assert confirmed.status_code == 200
    body = confirmed.json()
    assert body["state"] == "topup_prompt"
    assert body["error"] is None
    assert body["plan"]["id"] == "creator"
    assert body["topup"]["eligible"] is True
    assert body["actions"] == ["topup", "cancel"]

    answered = await client.post(
        f"/v1/blocked-runs/{blocked['id']}/topup",
        json={"enable": True, "threshold": 100, "quantity": 1000},
        headers=tenant.headers,
    )
    assert answered.status_code == 200, answered.text
    body = answered.json()
    assert body["state"] == "resumed"
    assert body["topup"] == {"eligible": True, "enabled": True, "threshold": 100, "quantity": 1000}
    assert body["actions"] == []

    # Every write is preceded by a read of what it would change.
    assert await mosaic_calls(mosaic, tenant) == [
        ("GET", "/plan"),
        ("GET", "/plan/list"),
        ("GET", "/plan"),
        ("POST", "/plan/upgrade"),
        ("GET", "/plan"),
        ("GET", "/plan"),
        ("GET", "/credits"),
        ("GET", "/credits"),
        ("POST", "/credits/settings"),
        ("POST", f"/agent_run/{run_id}/resume"),
    ]

    detail = (await client.get(f"/v1/blocked-runs/{blocked['id']}", headers=tenant.headers)).json()
    assert [(h["from_state"], h["to_state"]) for h in detail["history"]] == [
        (None, "checking_plan"),
        ("checking_plan", "awaiting_choice"),
        ("awaiting_choice", "awaiting_checkout"),
        ("awaiting_checkout", "topup_prompt"),
        ("topup_prompt", "resuming"),
        ("resuming", "resumed"),
    ]
    # Steps a person asked for are theirs in the history; the system's own reads are its.
    assert detail["history"][1]["actor"] == "system"
    assert detail["history"][2]["actor"] == "user:person"
    assert detail["history"][4]["actor"] == "user:person"

    async def completed() -> bool:
        return (await sandbox_run(mosaic, run_id))["status"] == "completed"

    await eventually(completed, what="the Mosaic run to complete")


async def test_internal_service_registers_a_run_and_an_immediate_upgrade_declines_topup(
    client: httpx.AsyncClient, mosaic: httpx.AsyncClient
) -> None:
    tenant = await make_tenant(client, mosaic, checkout=False)
    run_id = await start_mosaic_run(mosaic, tenant, report=False)
    registered = await client.post(
        "/v1/blocked-runs", json={"run_id": run_id}, headers=tenant.service_headers
    )
    assert registered.status_code == 201, registered.text
    assert registered.json()["state"] == "checking_plan"
    assert registered.json()["pending"] is True
    again = await client.post(
        "/v1/blocked-runs", json={"run_id": run_id}, headers=tenant.service_headers
    )
    assert again.status_code == 200
    assert again.json()["id"] == registered.json()["id"]

    blocked = await wait_for_state(client, tenant, registered.json()["id"], "awaiting_choice")
    chosen = await client.post(
        f"/v1/blocked-runs/{blocked['id']}/choose-plan",
        json={"plan_id": "professional"},
        headers=tenant.headers,
    )
    assert chosen.status_code == 200, chosen.text
    assert chosen.json()["state"] == "topup_prompt"
    assert chosen.json()["checkout_url"] is None

    declined = await client.post(
        f"/v1/blocked-runs/{blocked['id']}/topup", json={"enable": False}, headers=tenant.headers
    )
    assert declined.status_code == 200, declined.text
    assert declined.json()["state"] == "resumed"
    assert declined.json()["topup"]["enabled"] is False

    calls = await mosaic_calls(mosaic, tenant)
    assert calls == [
        ("GET", "/plan"),
        ("GET", "/plan/list"),
        ("GET", "/plan"),
        ("POST", "/plan/upgrade"),
        ("POST", f"/agent_run/{run_id}/resume"),
    ]


async def test_paid_organization_with_auto_topup_on_resumes_without_asking(
    client: httpx.AsyncClient, mosaic: httpx.AsyncClient
) -> None:
    tenant = await make_tenant(client, mosaic, plan_id="creator", balance=0)
    run_id = await start_mosaic_run(mosaic, tenant, report=False)
    # Someone turned auto top-up on in Mosaic after the run blocked (it buys credits at once).
    (
        await mosaic.post(
            "/credits/settings",
            headers=bearer(tenant.mosaic_key),
            json={"auto_topup": {"enabled": True, "threshold": 100, "quantity": 1000}},
        )
    ).raise_for_status()
    registered = await client.post(
        "/v1/blocked-runs", json={"run_id": run_id}, headers=tenant.service_headers
    )
    assert registered.status_code == 201
    done = await wait_for_state(client, tenant, registered.json()["id"], "resumed")
    assert done["topup"]["enabled"] is True
    calls = await mosaic_calls(mosaic, tenant)
    assert calls[-3:] == [
        ("GET", "/plan"),
        ("GET", "/credits"),
        ("POST", f"/agent_run/{run_id}/resume"),
    ]


async def test_paid_organization_without_auto_topup_is_asked(
    client: httpx.AsyncClient, mosaic: httpx.AsyncClient
) -> None:
    tenant = await make_tenant(client, mosaic, plan_id="professional", balance=0)
    run_id = await start_mosaic_run(mosaic, tenant)
    blocked = await blocked_run_for(client, tenant, run_id)
    prompt = await wait_for_state(client, tenant, blocked["id"], "topup_prompt")
    assert prompt["plan"]["id"] == "professional"
    assert prompt["topup"]["enabled"] is False
    # The plan list is read too, so the top-up question carries its price.
    assert await mosaic_calls(mosaic, tenant) == [
        ("GET", "/plan"),
        ("GET", "/credits"),
        ("GET", "/plan/list"),
    ]
