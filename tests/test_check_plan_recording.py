"""`check_plan` records on the plain asyncpg pool (`app.organizations.recording`): what it may
not record when, mid-step, its lease is lost or the decision moves past it.

The step is run by hand (no worker), with Mosaic's plan list slowed down so the interference
lands while the step is between its two transactions, as it would in production.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
from sqlalchemy import text

from app.blocked_runs.state_machine import Event
from app.organizations import repository as decisions
from app.organizations.state_machine import transition
from app.organizations.steps import check_plan
from app.work_queue import LeaseLost, claim_due
from conftest import (
    Stack,
    Tenant,
    blocked_run_for,
    eventually,
    isolated_stack,
    make_tenant,
    mosaic_calls,
    start_mosaic_run,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")
PLAN_LIST = ("GET", "/plan/list")


async def _step_in_flight(stack: Stack, tenant: Tenant) -> tuple[asyncio.Task[None], int]:
    """A blocked run's check_plan, claimed and started, now waiting on a slow GET /plan/list."""
    rt = stack.service.runtime
    run_id = await start_mosaic_run(stack.mosaic, tenant)
    await blocked_run_for(stack.client, tenant, run_id)
    await stack.fault(method="GET", path="/plan/list", action="latency", latency_ms=1500, count=1)
    (job,) = await claim_due(rt.db, "by-hand", limit=5, lease=rt.settings.job_lease)
    assert job.kind == "check_plan"
    step = asyncio.create_task(check_plan(rt, job))

    async def asked() -> bool:
        return PLAN_LIST in await mosaic_calls(stack.mosaic, tenant)

    await eventually(asked, what="the step to be waiting on GET /plan/list")
    return step, job.id


async def _facts(stack: Stack, tenant: Tenant, job_id: int) -> dict[str, object]:
    account = uuid.UUID(tenant.account_id)
    async with stack.service.runtime.db.sessions() as session:
        decision = await decisions.get(session, account)
        assert decision is not None
        job = (
            await session.execute(
                text("SELECT status, locked_by FROM jobs WHERE id = :id"), {"id": job_id}
            )
        ).one()
        runs = (
            await session.execute(
                text("SELECT state FROM blocked_runs WHERE account_id = :a"), {"a": account}
            )
        ).scalars()
        moves = (
            await session.execute(
                text(
                    "SELECT event FROM organization_decision_history WHERE account_id = :a "
                    "ORDER BY id"
                ),
                {"a": account},
            )
        ).scalars()
        return {
            "decision": decision.state,
            "job": tuple(job),
            "runs": sorted(runs),
            "moves": list(moves),
        }


async def test_a_check_whose_lease_is_lost_mid_step_records_nothing() -> None:
    async with isolated_stack("check_plan_lease_lost", worker=False) as stack:
        tenant = await make_tenant(stack.client, stack.mosaic, checkout=False)
        step, job_id = await _step_in_flight(stack, tenant)
        # The lease ran out while Mosaic was slow: another worker claimed the job.
        async with stack.service.runtime.db.transaction() as session:
            await session.execute(
                text("UPDATE jobs SET locked_by = 'thief' WHERE id = :id"), {"id": job_id}
            )
        with pytest.raises(LeaseLost):
            await step
        assert await _facts(stack, tenant, job_id) == {
            "decision": "checking_plan",  # the round it opened, and no answer recorded
            "job": ("pending", "thief"),
            "runs": ["checking_plan"],
            "moves": ["blocked"],
        }


async def test_a_check_overtaken_by_another_move_closes_its_job_and_moves_nothing() -> None:
    async with isolated_stack("check_plan_overtaken", worker=False) as stack:
        tenant = await make_tenant(stack.client, stack.mosaic, checkout=False)
        step, job_id = await _step_in_flight(stack, tenant)
        # The decision moves meanwhile (under its lock, as every move does).
        async with stack.service.runtime.db.transaction() as session:
            decision = await decisions.lock(session, uuid.UUID(tenant.account_id))
            await transition(session, decision, Event.GIVE_UP, actor="test", reason="overtaken")
        await step
        assert await _facts(stack, tenant, job_id) == {
            "decision": "idle",
            "job": ("done", "by-hand"),
            "runs": ["checking_plan"],  # not moved by the stale reading of the plan
            "moves": ["blocked", "give_up"],
        }


async def test_a_check_records_the_move_its_runs_and_the_outbox_in_one_go() -> None:
    async with isolated_stack("check_plan_records", worker=False) as stack:
        tenant = await make_tenant(stack.client, stack.mosaic, checkout=False)
        async with stack.service.runtime.db.transaction() as session:
            # A subscriber to `decision.needed` (never delivered to here: no worker runs).
            await session.execute(
                text(
                    "INSERT INTO subscriptions (id, account_id, url, event_types, "
                    "secret_encrypted) VALUES (gen_random_uuid(), :a, 'https://example.com/h', "
                    "ARRAY['decision.needed'], 'unused')"
                ),
                {"a": uuid.UUID(tenant.account_id)},
            )
        step, job_id = await _step_in_flight(stack, tenant)
        await step
        assert await _facts(stack, tenant, job_id) == {
            "decision": "awaiting_choice",
            "job": ("done", "by-hand"),
            "runs": ["awaiting_choice"],
            "moves": ["blocked", "plan_free"],
        }
        async with stack.service.runtime.db.sessions() as session:
            needed = (
                await session.execute(
                    text(
                        "SELECT payload FROM notification_deliveries "
                        "WHERE account_id = :a AND event_type = 'decision.needed'"
                    ),
                    {"a": uuid.UUID(tenant.account_id)},
                )
            ).scalars()
            (payload,) = list(needed)
        assert payload["data"]["state"] == "awaiting_choice"
        assert payload["data"]["asks"] == ["choose_plan"]
        assert [p["id"] for p in payload["data"]["plans"]]


async def test_a_round_opened_meanwhile_is_joined_not_opened_twice() -> None:
    async with isolated_stack("check_plan_round_race", worker=False) as stack:
        tenant = await make_tenant(stack.client, stack.mosaic, checkout=False)
        rt = stack.service.runtime
        run_id = await start_mosaic_run(stack.mosaic, tenant)
        await blocked_run_for(stack.client, tenant, run_id)
        (job,) = await claim_due(rt.db, "by-hand", limit=5, lease=rt.settings.job_lease)
        account = uuid.UUID(tenant.account_id)
        async with rt.db.transaction() as session:
            # Another move holds the decision's lock and opens the round first; the step's
            # statement waits on that lock and must see the round as it is once it commits.
            decision = await decisions.lock(session, account)
            assert decision.state == "idle"
            await transition(session, decision, Event.BLOCKED, actor="test", reason="first")
            step = asyncio.create_task(check_plan(rt, job))
            await asyncio.sleep(0.5)
            assert not step.done()
        await step
        facts = await _facts(stack, tenant, job.id)
        assert facts == {
            "decision": "awaiting_choice",
            "job": ("done", "by-hand"),
            "runs": ["awaiting_choice"],
            "moves": ["blocked", "plan_free"],
        }
        async with rt.db.sessions() as session:
            decision = await decisions.get(session, account)
            assert decision is not None
            assert decision.round == 1
