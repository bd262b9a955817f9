"""The webhook endpoint: signatures, malformed bodies, deduplication, and what each event does."""

from __future__ import annotations

import asyncio
import json
import uuid

import httpx
import pytest
from sqlalchemy import text

from app.work_queue import claim_due
from app.worker import execute
from conftest import (
    Service,
    Tenant,
    assert_problem,
    bearer,
    blocked_run_for,
    deliver,
    eventually,
    finished_event,
    isolated_stack,
    make_tenant,
    mosaic_calls,
    start_mosaic_run,
    verifications_settled,
    wait_for_state,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_wrong_or_missing_signature_is_refused_and_nothing_is_stored(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    run_id = f"run-{uuid.uuid4()}"
    wrong = await deliver(client, tenant, finished_event(run_id), signature="whsec_wrong")
    assert wrong.status_code == 401
    assert wrong.headers["content-type"].startswith("application/problem+json")
    assert wrong.json()["code"] == "bad_signature"
    missing = await deliver(client, tenant, finished_event(run_id), signature="")
    assert missing.status_code == 401
    listed = await client.get("/v1/blocked-runs", params={"run_id": run_id}, headers=tenant.headers)
    assert listed.json()["items"] == []


async def test_an_unknown_account_is_answered_like_a_bad_signature(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    """No account-id oracle: whether the account exists cannot be told from the answer."""
    unknown = await client.post(
        f"/v1/webhooks/mosaic/{uuid.uuid4()}",
        json=finished_event("r"),
        headers={"X-Mosaic-Signature": tenant.webhook_secret},
    )
    wrong = await deliver(client, tenant, finished_event("r"), signature="whsec_wrong")
    assert unknown.status_code == wrong.status_code == 401
    assert unknown.json()["code"] == "bad_signature"
    assert unknown.json() == wrong.json()
    assert unknown.headers["www-authenticate"] == wrong.headers["www-authenticate"]


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"{not json", 400),
        (b"[1, 2]", 422),
        (b'"text"', 422),
        (json.dumps({"flag": "RUN_FINISHED"}).encode(), 422),
        (json.dumps({"run_id": "r1"}).encode(), 422),
        (json.dumps({"flag": 7, "run_id": "r1"}).encode(), 422),
        (json.dumps({"flag": "RUN_FINISHED", "run_id": ["r1"]}).encode(), 422),
        (json.dumps({"flag": "RUN_FINISHED", "run_id": "r1", "status": 3}).encode(), 422),
        (b"\xff\xfe\x00", 400),
        (b'{"flag": "RUN_FINISHED", "run_id": "r\\u0000x", "needs_credits": true}', 400),
        (b'{"flag": "RUN_FINISHED", "run_id": "r1", "needs_credits": NaN}', 400),
        (
            b'{"flag": "RUN_FINISHED", "run_id": "r1", "x": '
            + b"[" * 100_000
            + b"]" * 100_000
            + b"}",
            400,
        ),
        (
            json.dumps(
                {"flag": "RUN_FINISHED", "run_id": "r" * 201, "needs_credits": True}
            ).encode(),
            422,
        ),
        (json.dumps({"flag": "RUN_FINISHED", "run_id": "r1", "agent_id": "a" * 201}).encode(), 422),
        (b"x" * 1_000_001, 413),
        # Numbers a double cannot hold were read as infinity, which jsonb refuses (a 500).
        (b'{"flag": "RUN_FINISHED", "run_id": "r1", "status": "failed", "x": 1e400}', 400),
        (b'{"flag": "RUN_FINISHED", "run_id": "r1", "status": "failed", "x": [-1e999]}', 400),
        # The node lists are read by the service: any other type was a TypeError (a 500).
        (json.dumps({"flag": "RUN_FINISHED", "run_id": "r1", "nodes": 5}).encode(), 422),
        (
            json.dumps(
                {"flag": "RUN_FINISHED", "run_id": "r1", "status": "failed", "nodes": 5}
            ).encode(),
            422,
        ),
        (json.dumps({"flag": "RUN_PROGRESS", "run_id": "r1", "updated_nodes": "x"}).encode(), 422),
        # Run ids that would be more (or less) than one path segment at Mosaic.
        (json.dumps({"flag": "RUN_FINISHED", "run_id": ".", "needs_credits": True}).encode(), 422),
        (json.dumps({"flag": "RUN_FINISHED", "run_id": "..", "status": "failed"}).encode(), 422),
        (
            json.dumps({"flag": "RUN_FINISHED", "run_id": "a/../b", "status": "failed"}).encode(),
            422,
        ),
    ],
)
async def test_malformed_bodies_are_4xx_never_5xx(
    client: httpx.AsyncClient, tenant: Tenant, body: bytes, status: int
) -> None:
    answer = await deliver(client, tenant, body)
    assert answer.status_code == status, answer.text
    assert answer.json()["status"] == status


async def test_concurrent_duplicate_deliveries_open_one_blocked_run(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    run_id = f"run-{uuid.uuid4()}"
    event = finished_event(run_id)
    answers = await asyncio.gather(*(deliver(client, tenant, event) for _ in range(12)))
    assert {a.status_code for a in answers} == {202}
    statuses = sorted(a.json()["status"] for a in answers)
    assert statuses.count("accepted") == 1
    assert statuses.count("duplicate") == 11

    # A different delivery about the same run (other counts) does not open a second episode.
    other = await deliver(client, tenant, finished_event(run_id, node_status_counts={"failed": 2}))
    assert other.json()["status"] == "duplicate"
    listed = await client.get("/v1/blocked-runs", params={"run_id": run_id}, headers=tenant.headers)
    assert len(listed.json()["items"]) == 1
    assert listed.json()["items"][0]["agent_id"] == "agent-7"


async def test_camel_case_flag_on_a_node_marks_the_run_blocked(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    run_id = f"run-{uuid.uuid4()}"
    event = finished_event(run_id)
    del event["needs_credits"]
    event["updated_nodes"] = [{"original_node_id": "n1", "status": "failed", "needsCredits": True}]
    answer = await deliver(client, tenant, event)
    assert answer.json()["status"] == "accepted"
    await blocked_run_for(client, tenant, run_id)


async def test_progress_completed_and_unknown_events_open_nothing(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    run_id = f"run-{uuid.uuid4()}"
    noise = [
        {
            "flag": "RUN_PROGRESS",
            "run_id": run_id,
            "status": "running",
            "updated_nodes": [{"original_node_id": "n", "status": "failed", "needs_credits": True}],
        },
        {"flag": "RUN_FINISHED", "run_id": run_id, "status": "completed", "needs_credits": False},
        {"flag": "RUN_STARTED", "run_id": run_id, "status": "running"},
        {"flag": "TEST", "run_id": run_id},
        {"flag": "SOMETHING_NEW", "run_id": run_id, "extra": {"nested": [1, 2]}},
    ]
    for event in noise:
        answer = await deliver(client, tenant, event)
        assert answer.status_code == 202
        assert answer.json()["status"] == "ignored", event
    listed = await client.get("/v1/blocked-runs", params={"run_id": run_id}, headers=tenant.headers)
    assert listed.json()["items"] == []


async def test_progress_events_are_counted_not_stored_and_acted_on_copies_still_deduplicated(
    client: httpx.AsyncClient, tenant: Tenant, service: Service
) -> None:
    run_id = f"run-{uuid.uuid4()}"
    ignored_before = await _webhooks_counted(client, "ignored")
    progress = {"flag": "RUN_PROGRESS", "run_id": run_id, "status": "running"}
    for _ in range(3):
        answer = await deliver(client, tenant, progress)
        assert answer.json()["status"] == "ignored"
    assert await _webhooks_counted(client, "ignored") == ignored_before + 3
    first = await deliver(client, tenant, finished_event(run_id))
    again = await deliver(client, tenant, finished_event(run_id))
    assert (first.json()["status"], again.json()["status"]) == ("accepted", "duplicate")
    async with service.runtime.db.sessions() as session:
        stored = (
            await session.execute(
                text("SELECT flag FROM webhook_events WHERE run_id = :r"), {"r": run_id}
            )
        ).scalars()
        assert list(stored) == ["RUN_FINISHED"]


async def test_news_of_a_run_with_no_open_episode_is_counted_not_stored(
    client: httpx.AsyncClient, tenant: Tenant, service: Service
) -> None:
    run_id = f"run-{uuid.uuid4()}"
    news = [
        {"flag": "RUN_STARTED", "run_id": run_id, "status": "running"},
        {"flag": "RUN_FINISHED", "run_id": run_id, "status": "completed", "needs_credits": False},
    ]
    for event in news:
        assert (await deliver(client, tenant, event)).json()["status"] == "ignored"
    async with service.runtime.db.sessions() as session:
        stored = await session.scalar(
            text("SELECT count(*) FROM webhook_events WHERE run_id = :r"), {"r": run_id}
        )
    assert stored == 0


async def _webhooks_counted(client: httpx.AsyncClient, outcome: str) -> float:
    metrics = (await client.get("/metrics")).text
    prefix = f'unblock_webhooks_total{{outcome="{outcome}"}} '
    lines = [line for line in metrics.splitlines() if line.startswith(prefix)]
    return float(lines[0].removeprefix(prefix)) if lines else 0.0


async def test_a_wrong_signature_is_refused_after_the_secret_hash_is_cached(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    event = {"flag": "RUN_PROGRESS", "run_id": f"run-{uuid.uuid4()}", "status": "running"}
    assert (await deliver(client, tenant, event)).status_code == 202  # now cached
    answer = await deliver(client, tenant, event, signature="whsec_wrong")
    assert_problem(answer, 401, "bad_signature")


async def test_run_started_is_verified_and_closes_an_episode_mosaic_shows_running_again(
    client: httpx.AsyncClient, mosaic: httpx.AsyncClient
) -> None:
    tenant = await make_tenant(client, mosaic)
    run_id = await start_mosaic_run(mosaic, tenant)
    blocked = await blocked_run_for(client, tenant, run_id)
    await wait_for_state(client, tenant, blocked["id"], "awaiting_choice")
    # Someone adds credits and resumes the run in Mosaic directly; Mosaic sends RUN_STARTED.
    patch = {"balance": 100_000}
    (await mosaic.patch(f"/_sandbox/orgs/{tenant.organization_id}", json=patch)).raise_for_status()
    direct = await mosaic.post(f"/agent_run/{run_id}/resume", headers=bearer(tenant.mosaic_key))
    assert direct.status_code == 200

    await wait_for_state(client, tenant, blocked["id"], "resumed")
    closed = (await client.get(f"/v1/blocked-runs/{blocked['id']}", headers=tenant.headers)).json()
    assert closed["history"][-1]["actor"] == "mosaic"
    assert closed["history"][-1]["event"] == "run_restarted"
    calls = await mosaic_calls(mosaic, tenant)
    assert ("GET", f"/agent_run/{run_id}") in calls  # asked before closing
    assert ("POST", f"/agent_run/{run_id}/resume") in calls  # only the direct one
    assert calls.count(("POST", f"/agent_run/{run_id}/resume")) == 1


async def test_a_late_run_started_leaves_a_run_mosaic_still_shows_blocked_waiting(
    client: httpx.AsyncClient, mosaic: httpx.AsyncClient, service: Service
) -> None:
    tenant = await make_tenant(client, mosaic)
    run_id = await start_mosaic_run(mosaic, tenant)
    blocked = await blocked_run_for(client, tenant, run_id)
    await wait_for_state(client, tenant, blocked["id"], "awaiting_choice")
    # A redelivered RUN_STARTED from before the block arrives after it.
    late = {"flag": "RUN_STARTED", "run_id": run_id, "status": "running", "agent_id": "agent-1"}
    answer = await deliver(client, tenant, late | {"delivery": "late copy"})
    assert answer.json()["status"] == "accepted"
    await verifications_settled(service, run_id)

    still = (await client.get(f"/v1/blocked-runs/{blocked['id']}", headers=tenant.headers)).json()
    assert still["state"] == "awaiting_choice"
    assert still["actions"] == ["choose_plan", "cancel"]
    calls = await mosaic_calls(mosaic, tenant)
    assert ("GET", f"/agent_run/{run_id}") in calls


async def test_failure_without_the_flag_is_verified_with_mosaic_before_blocking(
    client: httpx.AsyncClient, mosaic: httpx.AsyncClient
) -> None:
    tenant = await make_tenant(client, mosaic)
    run_id = await start_mosaic_run(mosaic, tenant, report=False)
    event = finished_event(run_id, needs_credits=False)
    del event["needs_credits"]
    answer = await deliver(client, tenant, event)
    assert answer.json()["status"] == "accepted"
    blocked = await blocked_run_for(client, tenant, run_id)
    await wait_for_state(client, tenant, blocked["id"], "awaiting_choice")
    calls = await mosaic_calls(mosaic, tenant)
    assert calls.index(("GET", f"/agent_run/{run_id}")) < calls.index(("GET", "/plan"))


async def test_failure_that_mosaic_says_is_not_about_credits_opens_nothing(
    client: httpx.AsyncClient, mosaic: httpx.AsyncClient, service: Service
) -> None:
    tenant = await make_tenant(client, mosaic, plan_id="creator", balance=100_000)
    run_id = await start_mosaic_run(mosaic, tenant, report=False)  # completes: enough credits
    event = finished_event(run_id, status="failed", status_message="Render crashed")
    del event["needs_credits"]
    assert (await deliver(client, tenant, event)).json()["status"] == "accepted"

    async def verified() -> bool:
        async with service.runtime.db.sessions() as session:
            status = await session.scalar(
                text(
                    "SELECT status FROM jobs WHERE kind = 'verify_run' AND payload->>'run_id' = :r"
                ),
                {"r": run_id},
            )
        return status == "done"

    await eventually(verified, what="the verification job to finish")
    assert ("GET", f"/agent_run/{run_id}") in await mosaic_calls(mosaic, tenant)
    listed = await client.get("/v1/blocked-runs", params={"run_id": run_id}, headers=tenant.headers)
    assert listed.json()["items"] == []


async def test_closing_an_episode_drops_its_pending_step_so_mosaic_is_not_called() -> None:
    async with isolated_stack("closed_episode", worker=False) as stack:
        topup = {"enabled": True, "threshold": 0, "quantity": 0}
        tenant = await make_tenant(
            stack.client, stack.mosaic, plan_id="creator", balance=0, auto_topup=topup
        )
        run_id = await start_mosaic_run(stack.mosaic, tenant)
        blocked = await blocked_run_for(stack.client, tenant, run_id)
        rt = stack.service.runtime
        # Run the organization's plan check by hand: auto top-up is on, so the run goes straight
        # to resuming with its resume step recorded, which no worker has run yet.
        (check,) = await claim_due(rt.db, "by-hand", limit=10, lease=rt.settings.job_lease)
        assert check.kind == "check_plan"
        await execute(rt, check)
        resuming = await stack.client.get(
            f"/v1/blocked-runs/{blocked['id']}", headers=tenant.headers
        )
        assert resuming.json()["state"] == "resuming"
        assert resuming.json()["pending"] is True

        cancelled = await stack.client.post(
            f"/v1/blocked-runs/{blocked['id']}/cancel", headers=tenant.headers
        )
        assert cancelled.json()["state"] == "cancelled"
        assert cancelled.json()["pending"] is False
        assert await claim_due(rt.db, "a-worker", limit=10, lease=rt.settings.job_lease) == []
        assert ("POST", f"/agent_run/{run_id}/resume") not in await mosaic_calls(
            stack.mosaic, tenant
        )


async def test_copies_of_one_failure_that_differ_in_a_field_ask_mosaic_once() -> None:
    async with isolated_stack("verify_once", worker=False) as stack:
        tenant = await make_tenant(stack.client, stack.mosaic, plan_id="creator", balance=100_000)
        run_id = await start_mosaic_run(stack.mosaic, tenant, report=False)  # completes
        copies = [
            finished_event(run_id, needs_credits=None, delivery_id=str(uuid.uuid4()))
            for _ in range(10)
        ]
        answers = await asyncio.gather(*(deliver(stack.client, tenant, c) for c in copies))
        assert {a.json()["status"] for a in answers} == {"accepted"}  # each one is stored
        rt = stack.service.runtime
        claimed = await claim_due(rt.db, "a-worker", limit=20, lease=rt.settings.job_lease)
        assert [job.kind for job in claimed] == ["verify_run"]
