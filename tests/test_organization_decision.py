"""One organization, one decision: races between siblings, purchases made elsewhere or lost in
transit, cancelled deciders, storms of actions and events, and the locks behind them.

Every test counts Mosaic's calls in the sandbox's log: the property is what Mosaic was asked to
do, not what unblock believes it did.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy import insert, text

from app.blocked_runs.models import Job
from app.organizations import repository as decisions
from app.organizations.service import INLINE_RELEASE, RELEASE_BATCH, expire_checkouts
from app.work_queue import JobKind, claim_due
from app.worker import execute
from conftest import (
    Service,
    Stack,
    Tenant,
    assert_problem,
    blocked_run_for,
    deliver,
    eventually,
    finished_event,
    isolated_stack,
    make_tenant,
    mosaic_calls,
    sandbox_run,
    start_mosaic_run,
    wait_for_state,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")
UPGRADE = ("POST", "/plan/upgrade")
SETTINGS = ("POST", "/credits/settings")


async def blocked_runs(stack: Stack, tenant: Tenant, count: int, state: str) -> list[dict]:
    runs = []
    for _ in range(count):
        run_id = await start_mosaic_run(stack.mosaic, tenant)
        blocked = await blocked_run_for(stack.client, tenant, run_id)
        runs.append(await wait_for_state(stack.client, tenant, blocked["id"], state))
    return runs


async def organization(stack: Stack, tenant: Tenant) -> dict[str, Any]:
    answer = await stack.client.get("/v1/organization", headers=tenant.headers)
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


async def decision_pending(stack: Stack, tenant: Tenant, step: str) -> None:
    async def pending() -> bool:
        return (await organization(stack, tenant))["pending_step"] == step

    await eventually(pending, what=f"the decision's {step} step to be under way")


async def test_sibling_choices_at_the_same_moment_buy_once() -> None:
    async with isolated_stack("sibling_choices") as stack:
        tenant = await make_tenant(stack.client, stack.mosaic, checkout=False)
        first, second = await blocked_runs(stack, tenant, 2, "awaiting_choice")
        # Mosaic is slow to answer the purchase: the second choice arrives while it is open.
        await stack.fault(method="POST", path="/plan/upgrade", action="latency", latency_ms=1500)
        buying = asyncio.create_task(
            stack.client.post(
                f"/v1/blocked-runs/{first['id']}/choose-plan",
                json={"plan_id": "professional"},
                headers=tenant.headers,
            )
        )
        await decision_pending(stack, tenant, "upgrade_plan")
        refused = await stack.client.post(
            f"/v1/blocked-runs/{second['id']}/choose-plan",
            json={"plan_id": "creator"},
            headers=tenant.headers,
        )
        body = assert_problem(refused, 409, "decision_in_progress")
        assert body["pending_step"] == "upgrade_plan"
        org_refused = await stack.client.post(
            "/v1/organization/choose-plan", json={"plan_id": "creator"}, headers=tenant.headers
        )
        assert_problem(org_refused, 409, "decision_in_progress")

        bought = await buying
        assert bought.status_code == 200, bought.text
        assert bought.json()["state"] == "topup_prompt"
        sibling = await wait_for_state(stack.client, tenant, second["id"], "topup_prompt")
        assert sibling["plan"]["id"] == "professional"
        calls = await mosaic_calls(stack.mosaic, tenant)
        assert calls.count(UPGRADE) == 1
        # The purchase was preceded by a read of the plan.
        assert calls[calls.index(UPGRADE) - 1] == ("GET", "/plan")
        org = (await stack.mosaic.get(f"/_sandbox/orgs/{tenant.organization_id}")).json()
        assert org["plan_id"] == "professional"


async def test_a_plan_bought_outside_unblock_is_not_bought_again() -> None:
    async with isolated_stack("bought_elsewhere") as stack:
        tenant = await make_tenant(stack.client, stack.mosaic)
        first, second = await blocked_runs(stack, tenant, 2, "awaiting_choice")
        # The organization buys a plan in Mosaic's dashboard while unblock offers plans.
        patch = {"plan_id": "creator"}
        url = f"/_sandbox/orgs/{tenant.organization_id}"
        (await stack.mosaic.patch(url, json=patch)).raise_for_status()

        chosen = await stack.client.post(
            f"/v1/blocked-runs/{first['id']}/choose-plan",
            json={"plan_id": "professional"},
            headers=tenant.headers,
        )
        assert chosen.status_code == 200, chosen.text
        assert chosen.json()["state"] == "topup_prompt"
        assert chosen.json()["plan"]["id"] == "creator"
        await wait_for_state(stack.client, tenant, second["id"], "topup_prompt")
        calls = await mosaic_calls(stack.mosaic, tenant)
        assert UPGRADE not in calls
        org = await organization(stack, tenant)
        assert org["state"] == "topup_prompt"
        assert org["actions"] == ["topup"]
        assert org["runs_waiting"] == 2
        assert "nothing bought" in org["history"][-1]["reason"]


async def test_cancelling_the_deciding_run_mid_purchase_keeps_the_purchase() -> None:
    async with isolated_stack("cancel_mid_purchase") as stack:
        tenant = await make_tenant(stack.client, stack.mosaic, checkout=False)
        deciding, sibling = await blocked_runs(stack, tenant, 2, "awaiting_choice")
        await stack.fault(
            method="POST", path="/plan/upgrade", action="latency", latency_ms=1500, count=1
        )
        buying = asyncio.create_task(
            stack.client.post(
                f"/v1/blocked-runs/{deciding['id']}/choose-plan",
                json={"plan_id": "creator"},
                headers=tenant.headers,
            )
        )
        await decision_pending(stack, tenant, "upgrade_plan")
        cancelled = await stack.client.post(
            f"/v1/blocked-runs/{deciding['id']}/cancel", headers=tenant.headers
        )
        assert cancelled.status_code == 200, cancelled.text
        assert cancelled.json()["state"] == "cancelled"
        await buying

        moved = await wait_for_state(stack.client, tenant, sibling["id"], "topup_prompt")
        assert moved["plan"]["id"] == "creator"
        assert moved["actions"] == ["topup", "cancel"]
        again = await stack.client.post(
            f"/v1/blocked-runs/{sibling['id']}/choose-plan",
            json={"plan_id": "creator"},
            headers=tenant.headers,
        )
        assert_problem(again, 409, "invalid_state")
        final = (
            await stack.client.get(f"/v1/blocked-runs/{deciding['id']}", headers=tenant.headers)
        ).json()
        assert final["state"] == "cancelled"
        assert (await mosaic_calls(stack.mosaic, tenant)).count(UPGRADE) == 1


async def test_an_upgrade_whose_answer_is_lost_is_read_back_not_bought_again() -> None:
    # Mosaic applies the purchase but answers after the client has given up: a lost answer.
    async with isolated_stack("lost_upgrade", mosaic_timeout=0.5) as stack:
        tenant = await make_tenant(stack.client, stack.mosaic, checkout=False)
        (run,) = await blocked_runs(stack, tenant, 1, "awaiting_choice")
        await stack.fault(
            method="POST", path="/plan/upgrade", action="latency", latency_ms=1200, count=1
        )
        chosen = await stack.client.post(
            f"/v1/blocked-runs/{run['id']}/choose-plan",
            json={"plan_id": "creator"},
            headers=tenant.headers,
        )
        assert chosen.status_code in (200, 202), chosen.text
        await wait_for_state(stack.client, tenant, run["id"], "topup_prompt", timeout=20)
        calls = await mosaic_calls(stack.mosaic, tenant)
        assert calls.count(UPGRADE) == 1
        after = calls[calls.index(UPGRADE) + 1 :]
        assert after[0] == ("GET", "/plan")  # the retry read the plan, found it paid, stopped


async def test_a_topup_write_whose_answer_is_lost_is_not_sent_again() -> None:
    async with isolated_stack("lost_topup", mosaic_timeout=0.5) as stack:
        tenant = await make_tenant(stack.client, stack.mosaic, plan_id="creator", balance=0)
        (run,) = await blocked_runs(stack, tenant, 1, "topup_prompt")
        await stack.fault(
            method="POST", path="/credits/settings", action="latency", latency_ms=1200, count=1
        )
        await stack.client.post(
            f"/v1/blocked-runs/{run['id']}/topup",
            json={"enable": True, "threshold": 100, "quantity": 1000},
            headers=tenant.headers,
        )
        done = await wait_for_state(stack.client, tenant, run["id"], "resumed", timeout=20)
        assert done["topup"]["enabled"] is True
        calls = await mosaic_calls(stack.mosaic, tenant)
        assert calls.count(SETTINGS) == 1
        assert calls.count(("GET", "/credits")) >= 2  # read before the write, and before the retry


async def test_a_storm_of_actions_and_events_on_one_organization() -> None:
    async with isolated_stack("storm", action_deadline=0.5) as stack:
        tenant = await make_tenant(stack.client, stack.mosaic, checkout=False)
        runs = await blocked_runs(stack, tenant, 6, "awaiting_choice")
        statuses: list[int] = []
        rng = random.Random(7)

        async def person(run: dict) -> None:
            url = f"/v1/blocked-runs/{run['id']}"
            for _ in range(200):
                current = (await stack.client.get(url, headers=tenant.headers)).json()
                if current["state"] in ("resumed", "failed", "cancelled", "expired"):
                    return
                action = rng.choice(current["actions"] or ["wait"])
                if action == "choose_plan":
                    plan = rng.choice(["creator", "professional"])
                    answer = await stack.client.post(
                        f"{url}/choose-plan", json={"plan_id": plan}, headers=tenant.headers
                    )
                elif action == "topup":
                    body = {"enable": rng.random() < 0.5, "threshold": 100, "quantity": 1000}
                    answer = await stack.client.post(
                        f"{url}/topup", json=body, headers=tenant.headers
                    )
                elif action == "confirm_checkout":
                    answer = await stack.client.post(
                        f"{url}/confirm-checkout", headers=tenant.headers
                    )
                else:
                    answer = await stack.client.get("/v1/organization", headers=tenant.headers)
                statuses.append(answer.status_code)
                await asyncio.sleep(0)
            raise AssertionError(f"run {run['id']} never settled")

        async def mosaic_noise() -> None:
            # Redelivered failures and late RUN_STARTEDs for every run, in any order.
            events = []
            for run in runs:
                events += [finished_event(run["run_id"])] * 2
                events.append({"flag": "RUN_STARTED", "run_id": run["run_id"], "status": "running"})
            rng.shuffle(events)
            for event in events:
                statuses.append((await deliver(stack.client, tenant, event)).status_code)

        await asyncio.gather(*(person(run) for run in runs), mosaic_noise())
        assert statuses
        assert max(statuses) < 500, sorted(set(statuses))
        for run in runs:
            final = await wait_for_state(stack.client, tenant, run["id"], "resumed")
            assert final["error"] is None
            assert (await sandbox_run(stack.mosaic, run["run_id"]))["resumes"] == 1
        calls = await mosaic_calls(stack.mosaic, tenant)
        assert calls.count(UPGRADE) == 1
        assert calls.count(SETTINGS) <= 1
        for run in runs:
            assert calls.count(("POST", f"/agent_run/{run['run_id']}/resume")) == 1
        org = await organization(stack, tenant)
        assert org["state"] == "decided"
        assert org["runs_waiting"] == 0


async def test_the_decision_lock_never_waits_on_rows_that_reference_the_account(
    client: httpx.AsyncClient, mosaic: httpx.AsyncClient, service: Service
) -> None:
    # The pair that deadlocked: a decision holding its organization's lock, and an insert that
    # references the account (a run, a job, a webhook) holding a key-share lock on it.
    rt = service.runtime
    tenant = await make_tenant(client, mosaic)
    account_id = uuid.UUID(tenant.account_id)
    new_job = insert(Job).values(
        kind=JobKind.VERIFY_RUN.value,
        account_id=account_id,
        payload={"run_id": f"run-{uuid.uuid4()}"},
        give_up_at=text("now() + interval '1 hour'"),
    )
    async with rt.db.transaction() as deciding:
        await decisions.lock(deciding, account_id)
        async with rt.db.transaction() as inserting:
            await asyncio.wait_for(inserting.execute(new_job), 2)
            await inserting.rollback()
    async with rt.db.transaction() as inserting:
        await inserting.execute(new_job)
        async with rt.db.transaction() as deciding:
            await asyncio.wait_for(decisions.lock(deciding, account_id), 2)
        await inserting.rollback()


async def test_news_that_arrives_while_its_verification_is_in_flight_is_not_lost() -> None:
    async with isolated_stack("verify_in_flight", worker=False) as stack:
        tenant = await make_tenant(stack.client, stack.mosaic)
        run_id = await start_mosaic_run(stack.mosaic, tenant, report=False)  # blocks for credits
        unflagged = finished_event(run_id)
        del unflagged["needs_credits"]
        assert (await deliver(stack.client, tenant, unflagged)).json()["status"] == "accepted"
        rt = stack.service.runtime
        (verifying,) = await claim_due(rt.db, "in-flight", limit=5, lease=rt.settings.job_lease)
        assert verifying.kind == "verify_run"
        # Another failure report arrives while that verification is under way.
        second = unflagged | {"status_message": "Insufficient credits (retry)"}
        assert (await deliver(stack.client, tenant, second)).json()["status"] == "accepted"
        await execute(rt, verifying)
        # The in-flight attempt does not close the job: it runs again, due now.
        (again,) = await claim_due(rt.db, "next", limit=5, lease=rt.settings.job_lease)
        assert again.id == verifying.id
        assert again.payload["requests"] == 2
        await execute(rt, again)
        # Mosaic confirmed the block: the run is open, and its organization's check recorded.
        left = await claim_due(rt.db, "last", limit=5, lease=rt.settings.job_lease)
        assert [job.kind for job in left] == ["check_plan"]
        blocked = await blocked_run_for(stack.client, tenant, run_id)
        assert blocked["state"] == "checking_plan"


async def test_registering_a_run_that_was_just_resumed_opens_no_second_episode() -> None:
    async with isolated_stack("register_resumed") as stack:
        topup = {"enabled": True, "threshold": 0, "quantity": 0}
        tenant = await make_tenant(
            stack.client, stack.mosaic, plan_id="creator", balance=0, auto_topup=topup
        )
        run_id = await start_mosaic_run(stack.mosaic, tenant, report=False)
        first = await stack.client.post(
            "/v1/blocked-runs", json={"run_id": run_id}, headers=tenant.service_headers
        )
        assert first.status_code == 201
        # Enough credits now: the resume sticks and the run completes.
        url = f"/_sandbox/orgs/{tenant.organization_id}"
        (await stack.mosaic.patch(url, json={"balance": 100_000})).raise_for_status()
        await wait_for_state(stack.client, tenant, first.json()["id"], "resumed")

        async def completed() -> bool:
            return (await sandbox_run(stack.mosaic, run_id))["status"] == "completed"

        await eventually(completed, what="the run to complete")
        # A service reports the run again from a stale view: Mosaic says it ran to the end, so
        # the answer is its last blocked run, resumed, and no new one.
        again = await stack.client.post(
            "/v1/blocked-runs", json={"run_id": run_id}, headers=tenant.service_headers
        )
        assert again.status_code == 200, again.text
        assert again.json()["id"] == first.json()["id"]
        assert again.json()["state"] == "resumed"
        listed = await stack.client.get(
            "/v1/blocked-runs", params={"run_id": run_id}, headers=tenant.headers
        )
        assert [i["state"] for i in listed.json()["items"]] == ["resumed"]
        assert ("GET", f"/agent_run/{run_id}") in await mosaic_calls(stack.mosaic, tenant)


async def test_the_organization_shows_one_decision_and_acts_on_it(
    client: httpx.AsyncClient, mosaic: httpx.AsyncClient
) -> None:
    tenant = await make_tenant(client, mosaic, checkout=False)
    other = await make_tenant(client, mosaic)
    idle = (await client.get("/v1/organization", headers=tenant.headers)).json()
    assert (idle["state"], idle["actions"], idle["runs_waiting"]) == ("idle", [], 0)
    nothing = await client.post(
        "/v1/organization/choose-plan", json={"plan_id": "creator"}, headers=tenant.headers
    )
    assert_problem(nothing, 409, "nothing_waiting")
    no_scope = await client.get("/v1/organization", headers=tenant.token("runs:register"))
    assert no_scope.status_code == 403

    runs = []
    for _ in range(3):
        run_id = await start_mosaic_run(mosaic, tenant)
        blocked = await blocked_run_for(client, tenant, run_id)
        runs.append(await wait_for_state(client, tenant, blocked["id"], "awaiting_choice"))
    org = (await client.get("/v1/organization", headers=tenant.headers)).json()
    assert org["state"] == "awaiting_choice"
    assert org["actions"] == ["choose_plan"]
    assert org["runs_waiting"] == 3
    assert "creator" in [p["id"] for p in org["plans"]]
    assert org["round"] == 1
    # Another account's organization is its own.
    theirs = (await client.get("/v1/organization", headers=other.headers)).json()
    assert (theirs["state"], theirs["runs_waiting"]) == ("idle", 0)

    unknown = await client.post(
        "/v1/organization/choose-plan", json={"plan_id": "enterprise"}, headers=tenant.headers
    )
    assert_problem(unknown, 422, "plan_not_offered")
    chosen = await client.post(
        "/v1/organization/choose-plan", json={"plan_id": "creator"}, headers=tenant.headers
    )
    assert chosen.status_code == 200, chosen.text
    assert chosen.json()["state"] == "topup_prompt"
    assert chosen.json()["actions"] == ["topup"]
    enabled = await client.post(
        "/v1/organization/topup",
        json={"enable": True, "threshold": 200, "quantity": 2000},
        headers=tenant.headers,
    )
    assert enabled.status_code == 200, enabled.text
    assert enabled.json()["state"] == "decided"
    assert enabled.json()["topup"]["enabled"] is True
    for run in runs:
        done = await wait_for_state(client, tenant, run["id"], "resumed")
        assert done["topup"]["threshold"] == 200
    events = [h["event"] for h in enabled.json()["history"]]
    assert events == ["blocked", "plan_free", "upgraded", "topup_enabled"]
    calls = await mosaic_calls(mosaic, tenant)
    assert calls.count(UPGRADE) == 1
    assert calls.count(SETTINGS) == 1


async def test_a_paid_checkout_moves_on_with_no_click() -> None:
    async with isolated_stack("checkout_poll", checkout_poll=0.2, checkout_poll_max=0.4) as stack:
        tenant = await make_tenant(stack.client, stack.mosaic)
        first, second = await blocked_runs(stack, tenant, 2, "awaiting_choice")
        chosen = await stack.client.post(
            f"/v1/blocked-runs/{first['id']}/choose-plan",
            json={"plan_id": "creator"},
            headers=tenant.headers,
        )
        checkout_id = chosen.json()["checkout_url"].rstrip("/").rsplit("/", 1)[1]
        sibling = (
            await stack.client.get(f"/v1/blocked-runs/{second['id']}", headers=tenant.headers)
        ).json()
        assert sibling["checkout_url"] == chosen.json()["checkout_url"]
        # The person pays and closes the tab: no confirm.
        await stack.mosaic.post(f"/_sandbox/checkouts/{checkout_id}/complete")
        for run in (first, second):
            moved = await wait_for_state(stack.client, tenant, run["id"], "topup_prompt")
            assert moved["plan"]["id"] == "creator"
        org = (await stack.client.get("/v1/organization", headers=tenant.headers)).json()
        assert org["history"][-1]["event"] == "checkout_confirmed"
        assert org["history"][-1]["actor"] == "system"
        assert (await mosaic_calls(stack.mosaic, tenant)).count(UPGRADE) == 1


async def test_a_checkout_left_open_past_its_ttl_goes_back_to_a_choice() -> None:
    async with isolated_stack("checkout_ttl", checkout_ttl=0) as stack:
        tenant = await make_tenant(stack.client, stack.mosaic)
        (run,) = await blocked_runs(stack, tenant, 1, "awaiting_choice")
        chosen = await stack.client.post(
            f"/v1/blocked-runs/{run['id']}/choose-plan",
            json={"plan_id": "creator"},
            headers=tenant.headers,
        )
        assert chosen.json()["state"] == "awaiting_checkout"
        assert await expire_checkouts(stack.service.runtime) == 1
        back = (
            await stack.client.get(f"/v1/blocked-runs/{run['id']}", headers=tenant.headers)
        ).json()
        assert back["state"] == "awaiting_choice"
        assert back["actions"] == ["choose_plan", "cancel"]
        assert back["checkout_url"] is None
        assert back["error"]["code"] == "checkout_expired"
        assert back["history"][-1]["event"] == "checkout_expired"
        async with stack.service.runtime.db.sessions() as session:
            polls = await session.scalar(
                text(
                    "SELECT count(*) FROM jobs WHERE kind = 'poll_checkout' AND status = 'pending'"
                )
            )
        assert polls == 0
        again = await stack.client.post(
            f"/v1/blocked-runs/{run['id']}/choose-plan",
            json={"plan_id": "creator"},
            headers=tenant.headers,
        )
        assert again.json()["state"] == "awaiting_checkout"
        assert again.json()["error"] is None


async def test_a_large_organization_is_released_in_bounded_batches() -> None:
    count = 2 * RELEASE_BATCH + 300
    async with isolated_stack("large_release", worker=False) as stack:
        tenant = await make_tenant(stack.client, stack.mosaic, checkout=False)
        rt = stack.service.runtime
        run_id = await start_mosaic_run(stack.mosaic, tenant)
        first = await blocked_run_for(stack.client, tenant, run_id)
        (check,) = await claim_due(rt.db, "by-hand", limit=5, lease=rt.settings.job_lease)
        await execute(rt, check)
        # The rest of a large organization, blocked meanwhile.
        async with rt.db.transaction() as session:
            await session.execute(
                text(
                    "INSERT INTO blocked_runs (id, account_id, run_id, state) "
                    "SELECT gen_random_uuid(), :a, 'seeded-' || g, 'awaiting_choice' "
                    "FROM generate_series(2, :n) AS g"
                ),
                {"a": uuid.UUID(tenant.account_id), "n": count},
            )

        chosen = await stack.client.post(
            "/v1/organization/choose-plan", json={"plan_id": "creator"}, headers=tenant.headers
        )
        assert chosen.json()["state"] == "topup_prompt"

        async def states() -> dict[str, int]:
            async with rt.db.sessions() as session:
                rows = await session.execute(
                    text(
                        "SELECT state, count(*) FROM blocked_runs WHERE account_id = :a GROUP BY 1"
                    ),
                    {"a": uuid.UUID(tenant.account_id)},
                )
            return dict(rows.all())

        assert (await states())["topup_prompt"] == INLINE_RELEASE

        async def analyzed() -> dict[str, int]:
            # Manual ANALYZEs only (autovacuum's are counted apart, in autoanalyze_count).
            async with rt.db.sessions() as session:
                rows = await session.execute(
                    text(
                        "SELECT relname, analyze_count FROM pg_stat_user_tables"
                        " WHERE relname IN ('jobs', 'blocked_runs')"
                    )
                )
            return dict(rows.all())

        before = await analyzed()
        (release_job,) = await claim_due(rt.db, "by-hand", limit=5, lease=rt.settings.job_lease)
        assert release_job.kind == "release_runs"
        await execute(rt, release_job)
        assert await states() == {"topup_prompt": count}
        # A release this large has the planner's statistics of what it changed refreshed, in
        # the background.
        await asyncio.gather(*rt.background)
        assert await analyzed() == {table: n + 1 for table, n in before.items()}

        declined = await stack.client.post(
            "/v1/organization/topup", json={"enable": False}, headers=tenant.headers
        )
        assert declined.json()["state"] == "decided"
        jobs = await claim_due(
            rt.db, "by-hand", limit=INLINE_RELEASE + 5, lease=rt.settings.job_lease
        )
        kinds = [j.kind for j in jobs]
        assert kinds.count("release_runs") == 1
        assert kinds.count("resume") == INLINE_RELEASE
        await execute(rt, next(j for j in jobs if j.kind == "release_runs"))
        assert await states() == {"resuming": count}
        async with rt.db.sessions() as session:
            per_run = await session.execute(
                text(
                    "SELECT count(*) FILTER (WHERE j.kind = 'resume') AS resumes, "
                    "count(DISTINCT j.blocked_run_id) AS runs FROM jobs j WHERE j.account_id = :a"
                ),
                {"a": uuid.UUID(tenant.account_id)},
            )
            resumes, distinct = per_run.one()
            moves = await session.scalar(
                text(
                    "SELECT count(*) FROM blocked_run_history h JOIN blocked_runs b "
                    "ON b.id = h.blocked_run_id WHERE b.account_id = :a "
                    "AND h.event = 'topup_declined'"
                ),
                {"a": uuid.UUID(tenant.account_id)},
            )
        assert resumes == distinct == count  # one resume step per run, none twice
        assert moves == count
        assert first["state"] == "checking_plan"
