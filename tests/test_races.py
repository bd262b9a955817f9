"""Events and decisions that cross each other: late copies, redeliveries, concurrent answers."""

from __future__ import annotations

import asyncio
import json
import uuid

import httpx
import pytest

from conftest import (
    Service,
    Tenant,
    bearer,
    blocked_run_for,
    deliver,
    eventually,
    finished_event,
    isolated_stack,
    make_tenant,
    mosaic_calls,
    sandbox_run,
    start_mosaic_run,
    verifications_settled,
    wait_for_state,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_a_late_run_started_does_not_close_a_run_we_are_still_resuming() -> None:
    async with isolated_stack("late_started", action_deadline=0.3) as stack:
        tenant = await make_tenant(stack.client, stack.mosaic, plan_id="creator", balance=0)
        run_id = await start_mosaic_run(stack.mosaic, tenant, report=False)
        registered = await stack.client.post(
            "/v1/blocked-runs", json={"run_id": run_id}, headers=tenant.service_headers
        )
        blocked = await wait_for_state(
            stack.client, tenant, registered.json()["id"], "topup_prompt"
        )
        resume = f"/agent_run/{run_id}/resume"
        await stack.fault(method="POST", path=resume, action="status", status=503, count=1)
        await stack.fault(method="POST", path=resume, action="latency", latency_ms=2000, count=1)
        declined = await stack.client.post(
            f"/v1/blocked-runs/{blocked['id']}/topup",
            json={"enable": False},
            headers=tenant.headers,
        )
        # The first resume failed (503) and the retry is slow: still resuming at the deadline.
        assert declined.status_code == 202
        assert declined.json()["state"] == "resuming"
        # Mosaic re-delivers the run's original RUN_STARTED while unblock waits to retry.
        late = {"flag": "RUN_STARTED", "run_id": run_id, "status": "running"}
        assert (await deliver(stack.client, tenant, late)).json()["status"] == "ignored"
        done = await wait_for_state(stack.client, tenant, blocked["id"], "resumed")
        assert done["error"] is None
        assert (await sandbox_run(stack.mosaic, run_id))["resumes"] == 1


async def test_a_redelivered_failure_after_the_resume_opens_no_new_episode(
    client: httpx.AsyncClient, mosaic: httpx.AsyncClient, service: Service
) -> None:
    tenant = await make_tenant(client, mosaic, plan_id="creator", balance=100_000)
    run_id = await start_mosaic_run(mosaic, tenant, report=False)  # completes: enough credits
    original = finished_event(run_id)
    first = await deliver(client, tenant, original)
    assert first.json()["status"] == "accepted"
    blocked = await blocked_run_for(client, tenant, run_id)
    prompt = await wait_for_state(client, tenant, blocked["id"], "topup_prompt")
    await client.post(
        f"/v1/blocked-runs/{prompt['id']}/topup", json={"enable": False}, headers=tenant.headers
    )
    await wait_for_state(client, tenant, blocked["id"], "resumed")

    again = await deliver(client, tenant, original)  # the same failure, delivered again
    assert again.json()["status"] == "accepted"  # stored; Mosaic is asked whether it holds
    await verifications_settled(service, run_id)
    assert ("GET", f"/agent_run/{run_id}") in await mosaic_calls(mosaic, tenant)
    listed = await client.get("/v1/blocked-runs", params={"run_id": run_id}, headers=tenant.headers)
    assert [i["state"] for i in listed.json()["items"]] == ["resumed"]


async def test_concurrent_answers_for_two_runs_of_one_organization_both_land(
    client: httpx.AsyncClient, mosaic: httpx.AsyncClient
) -> None:
    tenant = await make_tenant(client, mosaic, plan_id="creator", balance=0)
    prompts = []
    for _ in range(2):
        run_id = await start_mosaic_run(mosaic, tenant)
        blocked = await blocked_run_for(client, tenant, run_id)
        prompts.append(await wait_for_state(client, tenant, blocked["id"], "topup_prompt"))
    answers = await asyncio.gather(
        *(
            client.post(
                f"/v1/blocked-runs/{p['id']}/topup", json={"enable": False}, headers=tenant.headers
            )
            for p in prompts
        )
    )
    # One answer decides for the organization; the other finds its run already released.
    assert sorted(a.status_code for a in answers) == [200, 409]
    (refused,) = [a for a in answers if a.status_code == 409]
    assert refused.json()["code"] == "invalid_state"
    assert refused.json()["state"] in ("resuming", "resumed")
    for prompt in prompts:
        await wait_for_state(client, tenant, prompt["id"], "resumed")
    org = (await client.get("/v1/organization", headers=tenant.headers)).json()
    assert [h["event"] for h in org["history"]].count("topup_declined") == 1


async def test_retry_after_the_resume_limit_gives_a_fresh_allowance(
    client: httpx.AsyncClient, mosaic: httpx.AsyncClient, service: object
) -> None:
    tenant = await make_tenant(client, mosaic, plan_id="creator", balance=0)
    looping = {"auto_topup": {"enabled": True, "threshold": 0, "quantity": 0}}
    (
        await mosaic.post("/credits/settings", headers=bearer(tenant.mosaic_key), json=looping)
    ).raise_for_status()
    run_id = await start_mosaic_run(mosaic, tenant)

    async def stopped() -> dict | None:
        page = await client.get(
            "/v1/blocked-runs", params={"run_id": run_id}, headers=tenant.headers
        )
        items = page.json()["items"]
        return items[0] if items and items[0]["state"] == "failed" else None

    failed = await eventually(stopped, timeout=20, what="the loop to stop")
    assert failed["error"]["code"] == "resume_limit_reached"
    # Credits are fixed in Mosaic; the person retries and the run resumes.
    patch = {"balance": 100_000, "auto_topup": {"enabled": False, "threshold": 0, "quantity": 0}}
    (await mosaic.patch(f"/_sandbox/orgs/{tenant.organization_id}", json=patch)).raise_for_status()
    retried = await client.post(f"/v1/blocked-runs/{failed['id']}/retry", headers=tenant.headers)
    assert retried.status_code == 200, retried.text
    # It blocked under the organization's standing decision, so it resumes without a question.
    body = await wait_for_state(client, tenant, failed["id"], "resumed")
    assert body["error"] is None
    history = (await client.get(f"/v1/blocked-runs/{failed['id']}", headers=tenant.headers)).json()
    assert [h["event"] for h in history["history"]][-3:] == [
        "retry",
        "org_topup_answered",
        "resume_accepted",
    ]

    async def completed() -> bool:
        return (await sandbox_run(mosaic, run_id))["status"] == "completed"

    await eventually(completed, what="the run to complete")


@pytest.mark.parametrize(
    "body",
    [
        b'{"flag": "RUN_FINISHED", "run_id": "r\\ud800", "needs_credits": true}',
        b'{"flag": "RUN_FINISHED", "run_id": "r1", "note": "\\udfff"}',
    ],
)
async def test_lone_surrogates_in_a_webhook_are_4xx(
    client: httpx.AsyncClient, tenant: Tenant, body: bytes
) -> None:
    answer = await deliver(client, tenant, body)
    assert answer.status_code == 400


async def test_text_the_database_cannot_store_is_422_everywhere(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    from conftest import ADMIN

    bad_register = await client.post(
        "/v1/blocked-runs",
        json={"run_id": f"run-{uuid.uuid4()}", "agent_id": "a\u0000b"},
        headers=tenant.service_headers,
    )
    assert bad_register.status_code == 422
    bad_filter = await client.get(
        "/v1/blocked-runs", params={"run_id": "x\u0000"}, headers=tenant.headers
    )
    assert bad_filter.status_code == 422
    for account in (
        {"name": "nul\u0000name", "mosaic_api_key": "mk_x"},
        {"name": "ok", "mosaic_api_key": "mk_\ud800"},
    ):
        raw = json.dumps(account).encode()  # ASCII escapes: "\ud800" reaches the server as is
        answer = await client.post(
            "/v1/accounts", content=raw, headers=ADMIN | {"Content-Type": "application/json"}
        )
        assert answer.status_code == 422, answer.text
        assert answer.headers["content-type"].startswith("application/problem+json")
