"""The per-organization switches for the three places Mosaic's documents disagree (§9)."""

from __future__ import annotations

import pytest

from .harness import Inbox, SandboxDriver
from .mosaic_shapes import (
    AgentRun,
    CheckoutUpgrade,
    Credits,
    LegacyCredits,
    RunFinishedEvent,
    RunNodes,
    event,
    expect,
    snake_case_needs_credits,
)

pytestmark = pytest.mark.asyncio


async def test_camel_case_needs_credits_on_run_nodes_and_webhooks(
    sandbox: SandboxDriver, inbox: Inbox
) -> None:
    org = await sandbox.org(balance=0, needs_credits_camel_case=True)
    run_id = await sandbox.start_run(org, inbox.url)
    received = await inbox.until_finished()

    finished = event(snake_case_needs_credits(received[-1].payload))
    assert isinstance(finished, RunFinishedEvent)
    assert finished.needs_credits is True

    run = (await org.client.get(f"/agent_run/{run_id}")).json()
    assert AgentRun.model_validate(snake_case_needs_credits(run)).needs_credits is True

    nodes = (await org.client.get(f"/agent_run/{run_id}/nodes")).json()
    nodes["nodes"] = [snake_case_needs_credits(node) for node in nodes["nodes"]]
    parsed = RunNodes.model_validate(nodes)
    assert [n.needs_credits for n in parsed.nodes] == [True, False, False, False]


async def test_snake_case_is_the_default(sandbox: SandboxDriver) -> None:
    org = await sandbox.org(balance=0)
    run_id = await sandbox.start_run(org)
    await sandbox.settled_run(org, run_id)
    body = (await org.client.get(f"/agent_run/{run_id}")).json()
    assert "needs_credits" in body
    assert "needsCredits" not in body


@pytest.mark.parametrize("success", [True, False])
async def test_checkout_answer_success_value_is_configurable(
    sandbox: SandboxDriver, success: bool
) -> None:
    org = await sandbox.org(checkout=True, checkout_success=success)
    answer = expect(
        await org.client.post("/plan/upgrade", json={"plan_id": "creator"}), CheckoutUpgrade
    )
    assert answer.success is success


async def test_legacy_nested_credits_shape(sandbox: SandboxDriver) -> None:
    org = await sandbox.org(plan_id="creator", balance=1840, legacy_credits_shape=True)
    legacy = expect(await org.client.get("/credits"), LegacyCredits)
    assert (legacy.plan, legacy.credits.balance, legacy.credits.included_usage) == (
        "creator",
        1840,
        2500,
    )
    assert legacy.credits.next_reset_at is not None

    await sandbox.patch(org, legacy_credits_shape=False)
    flat = expect(await org.client.get("/credits"), Credits)
    assert flat.balance == 1840


async def test_quirks_can_be_switched_on_later(sandbox: SandboxDriver) -> None:
    org = await sandbox.org(checkout=True)
    state = await sandbox.patch(org, checkout_success=False, needs_credits_camel_case=True)
    assert (state["checkout_success"], state["needs_credits_camel_case"]) == (False, True)
    answer = expect(
        await org.client.post("/plan/upgrade", json={"plan_id": "creator"}), CheckoutUpgrade
    )
    assert answer.success is False
