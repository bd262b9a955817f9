"""Resumes claimed together, called side by side, recorded in one set-based transaction.

Each test drives the worker's own pieces by hand (claim, execute) on a service without a
worker, so the interleaving is forced, and counts the resume calls in the sandbox's log.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable

import pytest
from sqlalchemy import text

from app.blocked_runs.state_machine import ResumeOutcome
from app.blocked_runs.steps import recorder
from app.runtime import Runtime
from app.work_queue import ClaimedJob, JobKind, claim_due
from app.worker import Worker, execute
from conftest import (
    Stack,
    Tenant,
    eventually,
    isolated_stack,
    make_tenant,
    mosaic_calls,
    sandbox_run,
    start_mosaic_run,
    wait_for_state,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")
RUNS = 5


async def _runs_resuming(stack: Stack) -> tuple[Tenant, dict[str, str]]:
    """RUNS credit-blocked runs of one paid organization, released by one decision into
    `resuming`, their resume jobs due and unclaimed: {blocked run id: Mosaic run id}."""
    tenant = await make_tenant(stack.client, stack.mosaic, plan_id="creator", balance=0)
    runs: dict[str, str] = {}
    for i in range(RUNS):
        run_id = await start_mosaic_run(stack.mosaic, tenant, f"agent-{i}", report=False)
        registered = await stack.client.post(
            "/v1/blocked-runs", json={"run_id": run_id}, headers=tenant.service_headers
        )
        registered.raise_for_status()
        runs[registered.json()["id"]] = run_id
    # No worker runs: the decision's check (GET /plan, GET /credits) is run here, by hand.
    rt = stack.service.runtime
    (check,) = await claim_due(rt.db, "check-worker", limit=5, lease=rt.settings.job_lease)
    assert check.kind is JobKind.CHECK_PLAN
    await execute(rt, check)
    for blocked_id in runs:
        await wait_for_state(stack.client, tenant, blocked_id, "topup_prompt")
    # Credits are bought meanwhile: a resumed run runs on instead of blocking again.
    patched = await stack.mosaic.patch(
        f"/_sandbox/orgs/{tenant.organization_id}", json={"balance": 100_000}
    )
    patched.raise_for_status()
    declined = await stack.client.post(
        "/v1/organization/topup", json={"enable": False}, headers=tenant.headers
    )
    assert declined.status_code in (200, 202), declined.text
    return tenant, runs


async def _claim_resumes(rt: Runtime, worker: str, count: int) -> list[ClaimedJob]:
    jobs = await claim_due(
        rt.db,
        worker,
        limit=count,
        lease=rt.settings.job_lease,
        resume_window=rt.settings.resume_window,
    )
    assert [job.kind for job in jobs] == [JobKind.RESUME] * count
    return jobs


def _spy_batches(rt: Runtime) -> list[int]:
    """Record the size of every batch the resume group commit writes (the real write runs)."""
    sizes: list[int] = []
    group = recorder(rt)
    write: Callable[[list[ResumeOutcome]], Awaitable[set[int]]] = group._flush

    async def counted(outcomes: list[ResumeOutcome]) -> set[int]:
        sizes.append(len(outcomes))
        return await write(outcomes)

    group._flush = counted
    return sizes


async def _resume_posts(stack: Stack, tenant: Tenant) -> Counter[str]:
    return Counter(
        path.split("/")[2]
        for method, path in await mosaic_calls(stack.mosaic, tenant)
        if method == "POST" and path.endswith("/resume")
    )


async def _history_events(rt: Runtime, blocked_id: str) -> list[str]:
    async with rt.db.sessions() as session:
        rows = await session.scalars(
            text("SELECT event FROM blocked_run_history WHERE blocked_run_id = :id ORDER BY id"),
            {"id": uuid.UUID(blocked_id)},
        )
        return list(rows)


async def test_a_batch_with_one_lost_answer_resumes_every_run_exactly_once() -> None:
    async with isolated_stack("resume_batch_lost", worker=False) as stack:
        rt = stack.service.runtime
        tenant, runs = await _runs_resuming(stack)
        sizes = _spy_batches(rt)
        lost_run = next(iter(runs.values()))
        # Mosaic applies this resume, but its answer never arrives (a 502 in its place).
        await stack.fault(
            method="POST",
            path=f"/agent_run/{lost_run}/resume",
            action="status",
            status=502,
            lost_answer=True,
            count=1,
        )
        jobs = await _claim_resumes(rt, "batch-worker", RUNS)
        # The claim brought what each step reads first: no read of the run before Mosaic.
        assert sorted(job.run_id or "" for job in jobs) == sorted(runs.values())
        assert all(job.earlier_resumes == 0 for job in jobs)
        await asyncio.gather(*(execute(rt, job) for job in jobs))

        # The four answered resumes were recorded together, in fewer transactions than runs.
        assert sum(sizes) == RUNS - 1
        assert max(sizes) > 1
        lost_blocked = next(b for b, r in runs.items() if r == lost_run)
        for blocked_id in runs:
            if blocked_id != lost_blocked:
                body = await wait_for_state(stack.client, tenant, blocked_id, "resumed")
                assert body["error"] is None
        async with rt.db.sessions() as session:
            state = await session.scalar(
                text("SELECT state FROM blocked_runs WHERE id = :id"),
                {"id": uuid.UUID(lost_blocked)},
            )
        assert state == "resuming"

        # The retry reads the run first, finds it running again, and sends no second resume.
        await asyncio.sleep(rt.settings.retry_max.total_seconds())
        (retry,) = await _claim_resumes(rt, "retry-worker", 1)
        assert retry.attempts == 2
        await execute(rt, retry)
        await wait_for_state(stack.client, tenant, lost_blocked, "resumed")

        assert await _resume_posts(stack, tenant) == Counter({run: 1 for run in runs.values()})
        for blocked_id, run_id in runs.items():
            assert (await sandbox_run(stack.mosaic, run_id))["resumes"] == 1
            events = await _history_events(rt, blocked_id)
            assert events.count("resume_accepted") == 1


async def test_a_lease_lost_mid_batch_drops_that_outcome_and_resumes_nobody_twice() -> None:
    async with isolated_stack("resume_batch_lease", worker=False) as stack:
        rt = stack.service.runtime
        tenant, runs = await _runs_resuming(stack)
        jobs = await _claim_resumes(rt, "slow-worker", RUNS)
        taken = jobs[0]
        # The slow worker's lease on one job runs out mid-batch, and another worker takes it.
        async with rt.db.transaction() as session:
            await session.execute(
                text("UPDATE jobs SET locked_until = now() - interval '1 second' WHERE id = :id"),
                {"id": taken.id},
            )
        (again,) = await _claim_resumes(rt, "other-worker", 1)
        assert again.id == taken.id
        assert again.attempts == 2

        # The slow worker's batch: every call goes out, but the taken job's outcome is not
        # its to record; the rest are recorded in one set-based finish.
        sizes = _spy_batches(rt)
        await asyncio.gather(*(execute(rt, job) for job in jobs))
        assert sum(sizes) == RUNS
        taken_blocked = str(taken.blocked_run_id)
        async with rt.db.sessions() as session:
            job_row = (
                await session.execute(
                    text("SELECT status, locked_by FROM jobs WHERE id = :id"), {"id": taken.id}
                )
            ).one()
            run_state = await session.scalar(
                text("SELECT state FROM blocked_runs WHERE id = :id"),
                {"id": taken.blocked_run_id},
            )
        assert tuple(job_row) == ("pending", "other-worker")
        assert run_state == "resuming"
        for blocked_id in runs:
            if blocked_id != taken_blocked:
                await wait_for_state(stack.client, tenant, blocked_id, "resumed")

        # The new owner's attempt reads Mosaic first: the run runs again, so no second resume.
        await execute(rt, again)
        await wait_for_state(stack.client, tenant, taken_blocked, "resumed")
        assert await _resume_posts(stack, tenant) == Counter({run: 1 for run in runs.values()})
        for blocked_id, run_id in runs.items():
            assert (await sandbox_run(stack.mosaic, run_id))["resumes"] == 1
            assert (await _history_events(rt, blocked_id)).count("resume_accepted") == 1


async def test_the_worker_frees_slots_before_commit_and_a_lost_write_is_retried_by_a_read() -> None:
    """In the worker loop a resume hands its outcome to the group commit and frees its slot: with
    one slot, the next runs are resumed while the first outcome's write is still held. When that
    write then fails (as a lost connection would), its job stays leased; once the lease runs out
    it is claimed again, reads the run first and never POSTs a second time."""
    async with isolated_stack(
        "resume_batch_detached", worker=False, job_lease=3, worker_concurrency=1
    ) as stack:
        tenant, runs = await _runs_resuming(stack)
        rt = stack.service.runtime
        group = recorder(rt)
        write: Callable[[list[ResumeOutcome]], Awaitable[set[int]]] = group._flush
        held = asyncio.Event()
        failed: list[int] = []

        async def first_write_held_then_lost(outcomes: list[ResumeOutcome]) -> set[int]:
            if not failed:
                failed.extend(o.job_id for o in outcomes)
                await held.wait()
                raise ConnectionResetError("the connection was lost mid-commit")
            return await write(outcomes)

        group._flush = first_write_held_then_lost
        stop = asyncio.Event()
        worker = asyncio.create_task(Worker(rt).run(stop))
        try:
            # Every run is resumed at Mosaic while the first write has not ended.
            async def all_posted() -> bool:
                return len(await _resume_posts(stack, tenant)) == len(runs)

            await eventually(all_posted, what="every run resumed while the first write is held")
            assert len(failed) == 1
            assert not held.is_set()
            held.set()
            for blocked_id in runs:
                await wait_for_state(stack.client, tenant, blocked_id, "resumed", timeout=30)
        finally:
            held.set()
            stop.set()
            await worker
        posts = await _resume_posts(stack, tenant)
        assert posts == Counter({run_id: 1 for run_id in runs.values()})
        async with rt.db.sessions() as session:
            lost_job = (
                await session.execute(
                    text(
                        "SELECT j.attempts, b.run_id FROM jobs AS j"
                        " JOIN blocked_runs AS b ON b.id = j.blocked_run_id WHERE j.id = :id"
                    ),
                    {"id": failed[0]},
                )
            ).one()
        reads = [
            path
            for method, path in await mosaic_calls(stack.mosaic, tenant)
            if method == "GET" and path == f"/agent_run/{lost_job.run_id}"
        ]
        # The job whose outcome was lost ran again after its lease and read its run first.
        assert lost_job.attempts == 2
        assert reads
