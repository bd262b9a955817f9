"""The spend guard: an account's monthly cap on auto top-up, refused at the API and again right
before unblock would write the setting to Mosaic."""

from __future__ import annotations

import uuid
from datetime import timedelta
from decimal import Decimal

import httpx
import pytest

from app.organizations.spend_guard import TopupPrice, price_for, refusal
from app.work_queue import JobKind, claim_due, enqueue_decision_job
from app.worker import execute
from conftest import (
    ADMIN,
    Tenant,
    assert_problem,
    blocked_run_for,
    isolated_stack,
    make_tenant,
    mosaic_calls,
    start_mosaic_run,
    wait_for_state,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")
SETTINGS = ("POST", "/credits/settings")
CREATOR = TopupPrice("creator", Decimal(2), 2500)


async def test_a_worst_case_month_buys_the_plans_monthly_credits_over_again() -> None:
    assert CREATOR.one_topup_usd(1000) == Decimal("20.00")
    assert CREATOR.topups_in_worst_month(1000) == 3  # 2,500 credits take three of 1,000
    assert CREATOR.worst_month_usd(1000) == Decimal("60.00")
    assert CREATOR.worst_month_usd(5000) == Decimal("100.00")  # one top-up, bigger than a month
    assert refusal(Decimal(60), CREATOR, 1000) is None
    over = refusal(Decimal("59.99"), CREATOR, 1000)
    assert over is not None
    assert over.code == "topup_over_spend_cap"
    assert over.status == 422
    # A single top-up over the cap is refused whatever the month.
    assert refusal(Decimal(99), CREATOR, 5000) is not None
    assert refusal(None, CREATOR, 1_000_000) is None
    unknown = refusal(Decimal(1000), None, 100)
    assert unknown is not None
    assert unknown.code == "topup_price_unknown"


async def test_the_rate_is_found_for_ids_the_newest_list_omits() -> None:
    legacy = [
        {
            "id": "professional",
            "aliases": ["professional", "professional_annual", "pro"],
            "credits_per_month": 10000,
            "top_up_rate_per_100_credits_usd": 1.6,
        }
    ]
    price = price_for({"id": "pro", "family": "professional"}, legacy)
    assert price == TopupPrice("pro", Decimal("1.6"), 10000)
    newest = [
        {"id": "professional", "credits_per_month": 10000, "top_up_rate_per_100_credits_usd": 1.6}
    ]
    assert price_for({"id": "pro", "family": "professional"}, newest) is not None
    assert price_for({"id": "enterprise"}, newest) is None
    assert price_for(None, newest) is None


async def set_cap(client: httpx.AsyncClient, tenant: Tenant, cap: object) -> httpx.Response:
    return await client.patch(
        f"/v1/accounts/{tenant.account_id}", json={"monthly_topup_cap_usd": cap}, headers=ADMIN
    )


async def test_only_an_admin_sets_the_cap_and_bad_values_are_refused(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    url = f"/v1/accounts/{tenant.account_id}"
    body = {"monthly_topup_cap_usd": "25"}
    assert_problem(await client.patch(url, json=body, headers=tenant.headers), 403, "missing_scope")
    assert_problem(await client.patch(url, json=body), 401)
    for bad in ("-1", "1000000.01", "ten", True):
        assert_problem(await set_cap(client, tenant, bad), 422, "validation_error")
    # Any number the document allows is taken, kept to the cent.
    cents = await set_cap(client, tenant, 10.006)
    assert cents.status_code == 200, cents.text
    assert Decimal(cents.json()["monthly_topup_cap_usd"]) == Decimal("10.01")
    assert_problem(
        await client.patch(f"/v1/accounts/{uuid.uuid4()}", json=body, headers=ADMIN),
        404,
        "account_not_found",
    )

    answer = await set_cap(client, tenant, "25.50")
    assert answer.status_code == 200, answer.text
    assert Decimal(answer.json()["monthly_topup_cap_usd"]) == Decimal("25.50")
    read = await client.get(url, headers=tenant.token("runs:read"))
    assert read.status_code == 200, read.text
    assert Decimal(read.json()["monthly_topup_cap_usd"]) == Decimal("25.50")
    org = (await client.get("/v1/organization", headers=tenant.headers)).json()
    assert Decimal(org["monthly_topup_cap_usd"]) == Decimal("25.50")

    cleared = await set_cap(client, tenant, None)
    assert cleared.json()["monthly_topup_cap_usd"] is None
    untouched = await client.patch(url, json={}, headers=ADMIN)
    assert untouched.json()["monthly_topup_cap_usd"] is None


async def test_a_setting_over_the_cap_is_refused_before_mosaic_hears_of_it(
    client: httpx.AsyncClient, mosaic: httpx.AsyncClient
) -> None:
    tenant = await make_tenant(client, mosaic, plan_id="creator", balance=0)
    assert (await set_cap(client, tenant, "50")).status_code == 200
    run_id = await start_mosaic_run(mosaic, tenant)
    blocked = await blocked_run_for(client, tenant, run_id)
    await wait_for_state(client, tenant, blocked["id"], "topup_prompt")

    org = (await client.get("/v1/organization", headers=tenant.headers)).json()
    assert org["topup_price"] == {
        "plan_id": "creator",
        "rate_per_100_credits_usd": 2.0,
        "credits_per_month": 2500,
    }
    over = {"enable": True, "threshold": 100, "quantity": 3000}  # one top-up: $60
    body = assert_problem(
        await client.post("/v1/organization/topup", json=over, headers=tenant.headers),
        422,
        "topup_over_spend_cap",
    )
    assert body["one_topup_usd"] == "60.00"
    assert body["worst_month_usd"] == "60.00"
    assert_problem(
        await client.post(
            f"/v1/blocked-runs/{blocked['id']}/topup", json=over, headers=tenant.headers
        ),
        422,
        "topup_over_spend_cap",
    )
    assert SETTINGS not in await mosaic_calls(mosaic, tenant)

    within = {"enable": True, "threshold": 100, "quantity": 2500}  # one top-up a month: $50
    answer = await client.post("/v1/organization/topup", json=within, headers=tenant.headers)
    assert answer.status_code == 200, answer.text
    assert answer.json()["topup"]["quantity"] == 2500
    assert (await mosaic_calls(mosaic, tenant)).count(SETTINGS) == 1


async def test_the_step_checks_the_cap_again_right_before_writing_to_mosaic() -> None:
    async with isolated_stack("spend_guard_step", worker=False) as stack:
        tenant = await make_tenant(stack.client, stack.mosaic, plan_id="creator", balance=0)
        run_id = await start_mosaic_run(stack.mosaic, tenant)
        await blocked_run_for(stack.client, tenant, run_id)
        rt = stack.service.runtime
        (check,) = await claim_due(rt.db, "w", limit=5, lease=rt.settings.job_lease)
        await execute(rt, check)
        org = (await stack.client.get("/v1/organization", headers=tenant.headers)).json()
        assert org["state"] == "topup_prompt"

        # An answer recorded under no cap; an admin sets one before a worker takes the step.
        async with rt.db.transaction() as session:
            await enqueue_decision_job(
                session,
                JobKind.SET_TOPUP,
                account_id=uuid.UUID(tenant.account_id),
                give_up_after=timedelta(minutes=5),
                payload={"threshold": 100, "quantity": 5000, "requested_by": "user:person"},
            )
        assert (await set_cap(stack.client, tenant, "80")).status_code == 200
        (step,) = await claim_due(rt.db, "w", limit=5, lease=rt.settings.job_lease)
        assert step.kind == "set_topup"
        await execute(rt, step)

        org = (await stack.client.get("/v1/organization", headers=tenant.headers)).json()
        assert org["state"] == "topup_prompt"
        assert org["error"]["code"] == "topup_over_spend_cap"
        assert "$100.00" in org["error"]["message"]
        assert org["actions"] == ["topup"]
        assert SETTINGS not in await mosaic_calls(stack.mosaic, tenant)
