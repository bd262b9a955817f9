"""Mosaic misbehaving: 5xx, 429 with Retry-After, dropped connections, slowness, refusals.

Each test gets its own database, sandbox and service, so its faults touch nobody else.
"""

from __future__ import annotations

from datetime import datetime

import pytest

from conftest import (
    Stack,
    blocked_run_for,
    isolated_stack,
    make_tenant,
    mosaic_calls,
    start_mosaic_run,
    wait_for_state,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def blocked_in(stack: Stack, state: str, **org: object) -> tuple[object, str, dict]:
    tenant = await make_tenant(stack.client, stack.mosaic, **org)
    run_id = await start_mosaic_run(stack.mosaic, tenant)
    blocked = await blocked_run_for(stack.client, tenant, run_id)
    return tenant, run_id, await wait_for_state(stack.client, tenant, blocked["id"], state)


async def test_mosaic_5xx_then_success_is_retried_until_it_works() -> None:
    async with isolated_stack("faults_5xx") as stack:
        await stack.fault(method="GET", path="/plan", action="status", status=503, count=2)
        tenant, _, blocked = await blocked_in(stack, "awaiting_choice")
        assert blocked["plans"]
        calls = await mosaic_calls(stack.mosaic, tenant)
        assert calls[:4] == [("GET", "/plan")] * 3 + [("GET", "/plan/list")]


async def test_429_retry_after_is_honoured() -> None:
    async with isolated_stack("faults_429") as stack:
        await stack.fault(method="GET", path="/plan", action="rate_limit", retry_after=0.6, count=1)
        tenant, _, _ = await blocked_in(stack, "awaiting_choice")
        answered = (
            await stack.mosaic.get(
                "/_sandbox/calls", params={"api_key": tenant.mosaic_key, "path": "/plan"}
            )
        ).json()
        assert [c["status"] for c in answered] == [429, 200]
        first, second = (datetime.fromisoformat(c["time"]) for c in answered)
        assert (second - first).total_seconds() >= 0.6


async def test_a_purchase_whose_connection_dropped_is_retried_after_a_settle_and_a_read() -> None:
    async with isolated_stack("faults_drop", mosaic_timeout=0.4) as stack:
        tenant, _, blocked = await blocked_in(stack, "awaiting_choice")
        await stack.fault(method="POST", path="/plan/upgrade", action="drop", count=1)
        chosen = await stack.client.post(
            f"/v1/blocked-runs/{blocked['id']}/choose-plan",
            json={"plan_id": "creator"},
            headers=tenant.headers,
        )
        # The connection dropped after the request went out: Mosaic may have acted, so the
        # retry waits (twice the client timeout) for such a request to land, then reads first.
        assert chosen.status_code in (200, 202), chosen.text
        done = await wait_for_state(stack.client, tenant, blocked["id"], "awaiting_checkout")
        assert done["checkout_url"]
        calls = await mosaic_calls(stack.mosaic, tenant)
        assert calls.count(("POST", "/plan/upgrade")) == 2
        second = len(calls) - 1 - calls[::-1].index(("POST", "/plan/upgrade"))
        assert calls[second - 1] == ("GET", "/plan")
        answered = (
            await stack.mosaic.get(
                "/_sandbox/calls",
                params={"api_key": tenant.mosaic_key, "path": "/plan/upgrade"},
            )
        ).json()
        first, last = (datetime.fromisoformat(c["time"]) for c in answered)
        assert (last - first).total_seconds() >= 0.8


async def test_slow_mosaic_answers_202_within_the_deadline_and_the_worker_finishes() -> None:
    async with isolated_stack("faults_slow", action_deadline=0.3) as stack:
        tenant, _, blocked = await blocked_in(stack, "awaiting_choice", checkout=False)
        await stack.fault(
            method="POST", path="/plan/upgrade", action="latency", latency_ms=1200, count=1
        )
        chosen = await stack.client.post(
            f"/v1/blocked-runs/{blocked['id']}/choose-plan",
            json={"plan_id": "creator"},
            headers=tenant.headers,
        )
        assert chosen.status_code == 202
        assert chosen.json()["state"] == "awaiting_choice"
        assert chosen.json()["pending"] is True
        assert chosen.json()["actions"] == ["cancel"]
        done = await wait_for_state(stack.client, tenant, blocked["id"], "topup_prompt")
        assert done["plan"]["id"] == "creator"
        # The slow call was not repeated: it finished in the background, once.
        calls = await mosaic_calls(stack.mosaic, tenant)
        assert calls.count(("POST", "/plan/upgrade")) == 1


async def test_mosaic_down_past_the_give_up_time_fails_the_run_with_a_reason() -> None:
    async with isolated_stack("faults_give_up", give_up_after=1.0, retry_max=0.3) as stack:
        await stack.fault(method="GET", path="/plan", action="status", status=502)
        tenant, _, failed = await blocked_in(stack, "failed")
        assert failed["error"]["code"] == "mosaic_unavailable"
        assert failed["actions"] == ["retry"]
        assert len(await mosaic_calls(stack.mosaic, tenant)) >= 2

        (await stack.mosaic.delete("/_sandbox/faults")).raise_for_status()
        retried = await stack.client.post(
            f"/v1/blocked-runs/{failed['id']}/retry", headers=tenant.headers
        )
        assert retried.status_code == 200
        assert retried.json()["state"] == "awaiting_choice"


async def test_mosaic_refusing_an_upgrade_keeps_the_choice_open_with_the_reason() -> None:
    async with isolated_stack("faults_refused") as stack:
        tenant, _, blocked = await blocked_in(stack, "awaiting_choice")
        await stack.fault(method="POST", path="/plan/upgrade", action="status", status=400, count=1)
        refused = await stack.client.post(
            f"/v1/blocked-runs/{blocked['id']}/choose-plan",
            json={"plan_id": "creator"},
            headers=tenant.headers,
        )
        assert refused.status_code == 200
        body = refused.json()
        assert body["state"] == "awaiting_choice"
        assert body["error"]["code"] == "upgrade_refused"
        assert body["actions"] == ["choose_plan", "cancel"]
        again = await stack.client.post(
            f"/v1/blocked-runs/{blocked['id']}/choose-plan",
            json={"plan_id": "creator"},
            headers=tenant.headers,
        )
        assert again.json()["state"] == "awaiting_checkout"
        assert again.json()["error"] is None


async def test_auto_topup_refused_with_403_keeps_the_question_open() -> None:
    async with isolated_stack("faults_403") as stack:
        tenant, _, blocked = await blocked_in(stack, "topup_prompt", plan_id="creator")
        await stack.fault(
            method="POST", path="/credits/settings", action="status", status=403, count=1
        )
        refused = await stack.client.post(
            f"/v1/blocked-runs/{blocked['id']}/topup",
            json={"enable": True, "threshold": 10, "quantity": 100},
            headers=tenant.headers,
        )
        assert refused.status_code == 200
        assert refused.json()["state"] == "topup_prompt"
        assert refused.json()["error"]["code"] == "topup_not_allowed"
        declined = await stack.client.post(
            f"/v1/blocked-runs/{blocked['id']}/topup",
            json={"enable": False},
            headers=tenant.headers,
        )
        assert declined.json()["state"] == "resumed"


async def test_the_other_documented_readings_of_mosaic_are_understood() -> None:
    """camelCase needsCredits, `success: false` on checkout, the older nested GET /credits."""
    async with isolated_stack("quirks") as stack:
        tenant, run_id, blocked = await blocked_in(
            stack,
            "awaiting_choice",
            needs_credits_camel_case=True,
            checkout_success=False,
            legacy_credits_shape=True,
        )
        chosen = await stack.client.post(
            f"/v1/blocked-runs/{blocked['id']}/choose-plan",
            json={"plan_id": "creator"},
            headers=tenant.headers,
        )
        assert chosen.json()["state"] == "awaiting_checkout"

        paid = await make_tenant(
            stack.client,
            stack.mosaic,
            plan_id="creator",
            legacy_credits_shape=True,
            needs_credits_camel_case=True,
        )
        paid_run = await start_mosaic_run(stack.mosaic, paid)
        found = await blocked_run_for(stack.client, paid, paid_run)
        prompt = await wait_for_state(stack.client, paid, found["id"], "topup_prompt")
        # The older shape carries no auto top-up settings: the person is asked.
        assert prompt["topup"]["enabled"] is False
        assert run_id
