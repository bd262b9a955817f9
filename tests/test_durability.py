"""Nothing is lost on a crash, nothing is done twice; the schema goes up and down."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from app import migrations
from app.database import Base, asyncpg_url
from app.work_queue import claim_due
from app.worker import Worker
from conftest import (
    ENCRYPTION_KEY,
    JWT_SECRET,
    Stack,
    Tenant,
    blocked_run_for,
    eventually,
    fresh_database,
    isolated_stack,
    make_tenant,
    mosaic_calls,
    sandbox_run,
    start_mosaic_run,
    wait_for_state,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")


@asynccontextmanager
async def worker_process(stack: Stack) -> AsyncIterator[asyncio.subprocess.Process]:
    """`unblock worker` as its own OS process, so it can be killed for real."""
    env = os.environ | {
        "DATABASE_URL": stack.database_url,
        "MOSAIC_BASE_URL": stack.sandbox.url,
        "UNBLOCK_ENV": "test",
        "UNBLOCK_JWT_SECRET": JWT_SECRET,
        "UNBLOCK_ENCRYPTION_KEY": ENCRYPTION_KEY,
        # Short, so a dead worker's claims come back soon; long enough for a step's calls on
        # a busy machine.
        "UNBLOCK_JOB_LEASE": "3",
        "UNBLOCK_POLL_INTERVAL": "0.2",
        "UNBLOCK_LOG_LEVEL": "WARNING",
    }
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "app", "worker", env=env)
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 15)


async def calls_to(stack: Stack, tenant: Tenant, method: str, path: str) -> int:
    return (await mosaic_calls(stack.mosaic, tenant)).count((method, path))


async def test_a_claim_whose_worker_died_before_calling_mosaic_is_finished_after_restart() -> None:
    async with isolated_stack("crash_before_call", worker=False, job_lease=1.5) as stack:
        tenant = await make_tenant(stack.client, stack.mosaic)
        run_id = await start_mosaic_run(stack.mosaic, tenant)
        blocked = await blocked_run_for(stack.client, tenant, run_id)
        assert blocked["state"] == "checking_plan"
        assert blocked["pending"]

        # A worker claims the recorded intent and dies before it calls Mosaic.
        rt = stack.service.runtime
        claimed = await claim_due(rt.db, "doomed-worker", limit=10, lease=rt.settings.job_lease)
        # The plan is the organization's: its decision's step, not the run's.
        assert [(job.kind, str(job.account_id)) for job in claimed] == [
            ("check_plan", tenant.account_id)
        ]
        assert await mosaic_calls(stack.mosaic, tenant) == []

        # A new worker takes it once the dead one's lease has run out, and finishes the work.
        stop = asyncio.Event()
        worker = asyncio.create_task(Worker(rt).run(stop))
        try:
            done = await wait_for_state(stack.client, tenant, blocked["id"], "awaiting_choice")
        finally:
            stop.set()
            await worker
        assert done["plans"]
        assert await mosaic_calls(stack.mosaic, tenant) == [("GET", "/plan"), ("GET", "/plan/list")]
        async with rt.db.sessions() as session:
            attempts = await session.scalar(
                text("SELECT attempts FROM jobs WHERE kind='check_plan'")
            )
        assert attempts == 2


async def test_a_crash_mid_resume_does_not_resume_the_run_twice() -> None:
    async with isolated_stack("crash_mid_resume", worker=False, action_deadline=0.3) as stack:
        tenant = await make_tenant(stack.client, stack.mosaic, plan_id="creator", balance=0)
        # No webhooks for this run: the only way unblock learns the resume landed is its own
        # retry, which reads the run before resuming.
        run_id = await start_mosaic_run(stack.mosaic, tenant, report=False)
        registered = await stack.client.post(
            "/v1/blocked-runs", json={"run_id": run_id}, headers=tenant.service_headers
        )
        blocked = registered.json()
        async with worker_process(stack):
            await wait_for_state(stack.client, tenant, blocked["id"], "topup_prompt")

        await stack.mosaic.patch(
            f"/_sandbox/orgs/{tenant.organization_id}", json={"balance": 100_000}
        )
        # Mosaic takes a while to answer the resume; the worker dies while it waits.
        resume_path = f"/agent_run/{run_id}/resume"
        await stack.fault(
            method="POST", path=resume_path, action="latency", latency_ms=1500, count=1
        )
        declined = await stack.client.post(
            f"/v1/blocked-runs/{blocked['id']}/topup",
            json={"enable": False},
            headers=tenant.headers,
        )
        # The request's own attempt is still waiting on Mosaic: it answers 202.
        assert declined.status_code == 202
        # The API process "crashes" while Mosaic is still working on the resume it asked for.
        for task in list(stack.service.runtime.background):
            task.cancel()

        async def resume_applied() -> bool:
            return (await sandbox_run(stack.mosaic, run_id))["resumes"] >= 1

        # Mosaic applies the resume; the answer never reaches anyone.
        await eventually(resume_applied, what="Mosaic to apply the resume")
        async with worker_process(stack) as proc:
            done = await wait_for_state(stack.client, tenant, blocked["id"], "resumed", timeout=20)
            assert proc.returncode is None
        assert done["error"] is None
        run = await sandbox_run(stack.mosaic, run_id)
        assert run["resumes"] == 1
        # Mosaic accepted the first resume; the retry after the crash read the run first, saw it
        # running again, and sent no second resume.
        assert await calls_to(stack, tenant, "POST", resume_path) == 1
        assert await calls_to(stack, tenant, "GET", f"/agent_run/{run_id}") >= 1


async def test_a_killed_worker_process_loses_no_work() -> None:
    async with isolated_stack("crash_sigkill", worker=False) as stack:
        tenant = await make_tenant(stack.client, stack.mosaic)
        await stack.fault(method="GET", path="/plan", action="latency", latency_ms=3000, count=1)
        run_id = await start_mosaic_run(stack.mosaic, tenant)
        blocked = await blocked_run_for(stack.client, tenant, run_id)
        async with worker_process(stack) as proc:

            async def calling() -> bool:
                return await calls_to(stack, tenant, "GET", "/plan") >= 1

            await eventually(calling, what="the worker to call Mosaic")
            proc.kill()  # SIGKILL: no cleanup, no goodbye
            await proc.wait()
        state = (
            await stack.client.get(f"/v1/blocked-runs/{blocked['id']}", headers=tenant.headers)
        ).json()
        assert state["state"] == "checking_plan"
        assert state["pending"]
        async with worker_process(stack):
            done = await wait_for_state(stack.client, tenant, blocked["id"], "awaiting_choice")
        assert done["plans"]


async def test_migrations_go_up_and_down_and_match_the_models() -> None:
    url = await fresh_database("migrations", migrate=False)
    await asyncio.to_thread(migrations.upgrade, url)
    expected = {"accounts", "blocked_runs", "blocked_run_history", "jobs", "webhook_events"}
    assert await _tables(url) >= expected
    engine = create_async_engine(asyncpg_url(url))
    async with engine.connect() as conn:
        diff = await conn.run_sync(
            lambda sync: compare_metadata(MigrationContext.configure(sync), Base.metadata)
        )
    await engine.dispose()
    assert diff == [], f"models and migrations disagree: {diff}"

    await asyncio.to_thread(migrations.downgrade, url, "base")
    assert await _tables(url) <= {"alembic_version"}
    await asyncio.to_thread(migrations.upgrade, url)
    assert "blocked_runs" in await _tables(url)


async def test_the_organization_decision_migration_moves_existing_data() -> None:
    url = await fresh_database("decision_migration", migrate=False)
    await asyncio.to_thread(migrations.upgrade, url, "0003")
    conn = await asyncpg.connect(str(make_url(url).set(drivername="postgresql")))
    try:
        accounts = {name: uuid.uuid4() for name in ("checkout", "answered", "checking", "quiet")}
        for name, account_id in accounts.items():
            await conn.execute(
                "INSERT INTO accounts (id, name, mosaic_api_key_encrypted, webhook_secret_hash, "
                "topup_answered_at) VALUES ($1, $2::text, 'x', 'y', "
                "CASE WHEN $2::text = 'answered' THEN now() END)",
                account_id,
                name,
            )

        async def run(account: str, state: str, **fields: str) -> uuid.UUID:
            run_id = uuid.uuid4()
            await conn.execute(
                "INSERT INTO blocked_runs (id, account_id, run_id, state, checkout_url, "
                "chosen_plan_id) VALUES ($1, $2, $3, $4, $5, $6)",
                run_id,
                accounts[account],
                f"mosaic-{run_id}",
                state,
                fields.get("checkout_url"),
                fields.get("chosen_plan_id"),
            )
            return run_id

        await run("checkout", "awaiting_choice")
        await run(
            "checkout", "awaiting_checkout", checkout_url="https://pay/1", chosen_plan_id="creator"
        )
        checking = await run("checking", "checking_plan")
        await conn.execute(
            "INSERT INTO jobs (kind, account_id, blocked_run_id, give_up_at) "
            "VALUES ('check_plan', $1, $2, now() + interval '1 hour')",
            accounts["checking"],
            checking,
        )
        await conn.close()
        await asyncio.to_thread(migrations.upgrade, url)
        conn = await asyncpg.connect(str(make_url(url).set(drivername="postgresql")))
        decisions = {
            r["account_id"]: r for r in await conn.fetch("SELECT * FROM organization_decisions")
        }
        checkout = decisions[accounts["checkout"]]
        assert checkout["state"] == "awaiting_checkout"
        assert checkout["checkout_url"] == "https://pay/1"
        assert checkout["chosen_plan_id"] == "creator"
        assert decisions[accounts["answered"]]["state"] == "decided"
        assert decisions[accounts["answered"]]["decided_at"] is not None
        assert decisions[accounts["checking"]]["state"] == "checking_plan"
        assert decisions[accounts["quiet"]]["state"] == "idle"
        jobs = await conn.fetch(
            "SELECT kind, account_id, blocked_run_id FROM jobs WHERE status = 'pending'"
        )
        pending = {(j["kind"], j["account_id"], j["blocked_run_id"]) for j in jobs}
        # The run's own check became its organization's; the run lagging behind the
        # organization's checkout is lined up by a release.
        assert pending == {
            ("check_plan", accounts["checking"], None),
            ("release_runs", accounts["checkout"], None),
        }
    finally:
        await conn.close()


async def test_history_is_append_only_in_the_database(service, client, mosaic) -> None:
    tenant = await make_tenant(client, mosaic)
    run_id = await start_mosaic_run(mosaic, tenant)
    blocked = await blocked_run_for(client, tenant, run_id)
    async with service.runtime.db.sessions() as session:
        with pytest.raises(Exception, match="append-only"):
            await session.execute(
                text(
                    "UPDATE blocked_run_history SET reason = 'rewritten' WHERE blocked_run_id = :i"
                ),
                {"i": blocked["id"]},
            )
        await session.rollback()
        with pytest.raises(Exception, match="append-only"):
            await session.execute(
                text("DELETE FROM blocked_run_history WHERE blocked_run_id = :i"),
                {"i": blocked["id"]},
            )


async def _tables(url: str) -> set[str]:
    conn = await asyncpg.connect(str(make_url(url).set(drivername="postgresql")))
    try:
        rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    finally:
        await conn.close()
    return {r["tablename"] for r in rows}
