"""Webhook delivery: payload shapes, signature, order per run, retries, never blocking the API."""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest

from mosaic_sandbox import SandboxServer

from .harness import RETRY_BASE, STEP_DELAY, Inbox, SandboxDriver, WebhookReceiver
from .mosaic_shapes import RunFinishedEvent, RunProgressEvent, RunStartedEvent, event

pytestmark = pytest.mark.asyncio


async def _deliveries(sandbox: SandboxDriver, run_id: str) -> list[dict[str, object]]:
    response = await sandbox.control.get("/_sandbox/webhooks", params={"run_id": run_id})
    deliveries: list[dict[str, object]] = response.json()
    return deliveries


async def test_a_completed_run_reports_every_node_in_order(
    sandbox: SandboxDriver, inbox: Inbox
) -> None:
    org = await sandbox.org(balance=1000, webhook_secret="s3cret")
    run_id = await sandbox.start_run(org, inbox.url)
    received = await inbox.until_finished()
    events = [event(w.payload) for w in received]

    assert isinstance(events[0], RunStartedEvent)
    assert isinstance(events[-1], RunFinishedEvent)
    progress = [e for e in events if isinstance(e, RunProgressEvent)]
    assert [(n.status) for e in progress for n in e.updated_nodes] == ["running", "completed"] * 4
    completed = [e.node_status_counts.completed for e in progress]
    assert completed == sorted(completed)
    assert {e.run_id for e in events} == {run_id}
    assert events[-1].outputs
    assert events[-1].outputs[0].original_node_id is not None
    assert progress[-1].updated_nodes[0].outputs == events[-1].outputs
    assert {w.signature for w in received} == {"s3cret"}

    log = await _deliveries(sandbox, run_id)
    assert [d["flag"] for d in log] == [w.payload["flag"] for w in received]
    assert all(d["delivered"] and d["attempts"] == 1 and d["last_status"] == 200 for d in log)


async def test_without_a_secret_there_is_no_signature_header(
    sandbox: SandboxDriver, inbox: Inbox
) -> None:
    org = await sandbox.org(balance=0, webhook_secret=None)
    await sandbox.start_run(org, inbox.url)
    received = await inbox.until_finished()
    assert {w.signature for w in received} == {None}


async def test_secret_changes_apply_to_later_events(sandbox: SandboxDriver, inbox: Inbox) -> None:
    org = await sandbox.org(balance=0)
    run_id = await sandbox.start_run(org, inbox.url)
    await inbox.until_finished()
    await sandbox.patch(org, webhook_secret="rotated", balance=1000)
    await org.client.post(f"/agent_run/{run_id}/resume")
    received = await inbox.until_finished()
    assert {w.signature for w in received} == {"rotated"}


async def test_failed_deliveries_are_retried_without_reordering(
    sandbox: SandboxDriver, inbox: Inbox
) -> None:
    inbox.failures = [500, 503, 404]
    org = await sandbox.org(balance=0)
    run_id = await sandbox.start_run(org, inbox.url)
    received = await inbox.until_finished()

    assert [w.payload["flag"] for w in received] == [
        "RUN_STARTED",
        "RUN_PROGRESS",
        "RUN_PROGRESS",
        "RUN_FINISHED",
    ]
    assert [a.answered for a in inbox.attempts[:4]] == [500, 503, 404, 200]
    log = await _deliveries(sandbox, run_id)
    assert [d["attempts"] for d in log] == [4, 1, 1, 1]
    assert all(d["delivered"] for d in log)


async def test_a_slow_receiver_never_blocks_the_api(sandbox: SandboxDriver, inbox: Inbox) -> None:
    inbox.hold = asyncio.Event()
    org = await sandbox.org(balance=0)
    run_id = await sandbox.start_run(org, inbox.url)
    run = await sandbox.settled_run(org, run_id)
    assert run["status"] == "failed"
    assert inbox.delivered.empty()
    log = await _deliveries(sandbox, run_id)
    assert [d["pending"] for d in log] == [True] * 4

    inbox.hold.set()
    received = await inbox.until_finished()
    assert len(received) == 4


async def test_deliveries_give_up_after_max_attempts() -> None:
    # A bound socket that never listens: every connection to it is refused.
    closed = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    closed.bind(("127.0.0.1", 0))
    unreachable = f"http://127.0.0.1:{closed.getsockname()[1]}/hook"
    async with (
        SandboxServer(
            step_delay=STEP_DELAY, webhook_retry_base=RETRY_BASE, webhook_max_attempts=2
        ) as server,
        httpx.AsyncClient(base_url=server.url) as control,
    ):
        created = (await control.post("/_sandbox/orgs", json={"balance": 0})).json()
        await control.post(
            "/_sandbox/runs",
            json={"organization_id": created["organization_id"], "callback_url": unreachable},
        )
        for _ in range(500):
            log = (await control.get("/_sandbox/webhooks")).json()
            if len(log) == 4 and not any(d["pending"] for d in log):
                break
            # The receiver is unreachable, so there is no arrival to await; poll the log.
            await asyncio.sleep(RETRY_BASE)
        assert [(d["delivered"], d["attempts"], d["last_status"]) for d in log] == [
            (False, 2, None)
        ] * 4
        assert all(d["last_error"] for d in log)
    closed.close()


async def test_runs_without_a_callback_send_nothing(sandbox: SandboxDriver) -> None:
    org = await sandbox.org(balance=0)
    run_id = await sandbox.start_run(org)
    await sandbox.settled_run(org, run_id)
    assert await _deliveries(sandbox, run_id) == []


async def test_events_of_different_runs_each_stay_in_order(
    sandbox: SandboxDriver, webhook_receiver: WebhookReceiver
) -> None:
    shared = webhook_receiver.inbox()
    shared.failures = [500] * 3
    org = await sandbox.org(balance=100_000)
    run_ids = [await sandbox.start_run(org, shared.url) for _ in range(3)]
    received = []
    finished = 0
    while finished < 3:
        webhook = await shared.next()
        received.append(webhook.payload)
        finished += webhook.payload["flag"] == "RUN_FINISHED"
    for run_id in run_ids:
        flags = [p["flag"] for p in received if p["run_id"] == run_id]
        assert flags == ["RUN_STARTED", *["RUN_PROGRESS"] * 8, "RUN_FINISHED"]
