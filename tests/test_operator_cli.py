"""The operator commands end to end: real processes on the service's database, while the
service runs; actions go through the API's service code and show the operator in history."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from typing import Any

import pytest
from sqlalchemy import text

from app.blocked_runs import repository
from app.blocked_runs.state_machine import Event, transition
from conftest import (
    ENCRYPTION_KEY,
    JWT_SECRET,
    Stack,
    Tenant,
    blocked_run_for,
    eventually,
    free_port,
    isolated_stack,
    make_tenant,
    start_mosaic_run,
    wait_for_state,
)
from notification_receiver import Receiver, all_delivered

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def unblock(stack: Stack, *args: str, **extra: str) -> tuple[int, str, str]:
    env = (
        os.environ
        | extra
        | {
            "DATABASE_URL": stack.database_url,
            "UNBLOCK_JWT_SECRET": JWT_SECRET,
            "UNBLOCK_ENCRYPTION_KEY": ENCRYPTION_KEY,
            "UNBLOCK_LOG_LEVEL": "WARNING",
            "UNBLOCK_ENV": "test",
            "MOSAIC_BASE_URL": stack.sandbox.url,
        }
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "app",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


def rows(out: str) -> list[dict[str, str]]:
    header, *lines = out.strip().splitlines()
    names = header.split("\t")
    return [dict(zip(names, line.split("\t"), strict=True)) for line in lines]


async def history_actors(stack: Stack, tenant: Tenant, blocked_id: str) -> list[tuple[str, str]]:
    run = (await stack.client.get(f"/v1/blocked-runs/{blocked_id}", headers=tenant.headers)).json()
    return [(h["event"], h["actor"]) for h in run["history"]]


async def test_operators_find_inspect_cancel_retry_and_replay_runs_from_the_command_line() -> None:
    async with isolated_stack("operator_cli") as stack:
        client, mosaic = stack.client, stack.mosaic
        tenant = await make_tenant(client, mosaic)
        other = await make_tenant(client, mosaic)
        ids = []
        for agent in ("agent-1", "agent-2"):
            blocked = await blocked_run_for(
                client, tenant, await start_mosaic_run(mosaic, tenant, agent)
            )
            await wait_for_state(client, tenant, blocked["id"], "awaiting_choice")
            ids.append(blocked["id"])
        elsewhere = await blocked_run_for(client, other, await start_mosaic_run(mosaic, other))
        first, second = ids

        code, out, err = await unblock(stack, "runs", "list", "--account", tenant.account_id)
        assert code == 0, err
        listed = rows(out)
        assert {r["id"] for r in listed} == set(ids)
        assert {r["state"] for r in listed} == {"awaiting_choice"}
        code, out, _ = await unblock(
            stack, "runs", "list", "--state", "awaiting_choice,checking_plan"
        )
        assert {r["id"] for r in rows(out)} >= {*ids, elsewhere["id"]}

        # Stuck: unchanged for longer than the threshold.
        async with stack.service.runtime.db.transaction() as session:
            await session.execute(
                text(
                    "UPDATE blocked_runs SET state_changed_at = now() - interval '2 hours' "
                    "WHERE id = :id"
                ),
                {"id": second},
            )
        code, out, _ = await unblock(stack, "runs", "list", "--stuck", "--stuck-after", "60")
        assert [r["id"] for r in rows(out)] == [second]

        code, out, err = await unblock(stack, "runs", "cancel", first, "--as", "alice")
        assert code == 0, err
        assert "cancelled by operator:alice" in out
        assert (await history_actors(stack, tenant, first))[-1] == ("cancel", "operator:alice")

        # A failed run, retried by an operator through the API's own retry.
        rt = stack.service.runtime
        async with rt.db.transaction() as session:
            run = await repository.lock(session, uuid.UUID(second))
            await transition(
                session,
                run,
                Event.GIVE_UP,
                actor="system",
                reason="test: Mosaic unreachable",
                error_code="mosaic_unavailable",
                error_message="Mosaic stayed unreachable.",
            )
        code, out, err = await unblock(stack, "runs", "show", second)
        assert code == 0, err
        shown = json.loads(out)
        assert shown["state"] == "failed"
        assert shown["error"]["code"] == "mosaic_unavailable"
        assert [h["to"] for h in shown["history"]][:2] == ["checking_plan", "awaiting_choice"]
        code, out, err = await unblock(stack, "runs", "retry", second, "--as", "bob")
        assert code == 0, err
        assert ("retry", "operator:bob") in await history_actors(stack, tenant, second)
        await wait_for_state(client, tenant, second, "awaiting_choice")

        # Refusals are one line and exit 1: cancelling a cancelled run, an unknown id.
        code, out, err = await unblock(stack, "runs", "cancel", first)
        assert code == 1
        assert err.count("\n") == 1
        assert err.startswith("unblock: ")
        code, _, err = await unblock(stack, "runs", "show", str(uuid.uuid4()))
        assert (code, err.strip()) == (1, "unblock: No such blocked run.")

        # Replaying the stored RUN_FINISHED of the cancelled run: Mosaic is asked again, still
        # says blocked, so a new episode opens.
        async with rt.db.sessions() as session:
            event_id = await session.scalar(
                text(
                    "SELECT id FROM webhook_events WHERE account_id = :a AND run_id = "
                    "(SELECT run_id FROM blocked_runs WHERE id = :b) AND flag = 'RUN_FINISHED'"
                ),
                {"a": tenant.account_id, "b": first},
            )
        code, out, err = await unblock(stack, "webhooks", "replay", str(event_id), "--as", "carol")
        assert code == 0, err
        assert out.strip().endswith(": accepted")
        run_id = (await client.get(f"/v1/blocked-runs/{first}", headers=tenant.headers)).json()[
            "run_id"
        ]

        async def reopened() -> bool:
            page = await client.get(
                "/v1/blocked-runs", params={"run_id": run_id}, headers=tenant.headers
            )
            return len(page.json()["items"]) == 2

        await eventually(reopened, what="the replayed event to open a new episode")
        code, _, err = await unblock(stack, "webhooks", "replay", "999999")
        assert (code, err.strip()) == (1, "unblock: No such webhook event.")


async def test_operators_list_deliveries_redeliver_and_enable_subscriptions() -> None:
    receiver = Receiver(free_port())
    await receiver.start()
    try:
        async with isolated_stack(
            "operator_deliveries", notify_allowed_networks="127.0.0.1/32", notify_retry_base=0.05
        ) as stack:
            client, mosaic = stack.client, stack.mosaic
            tenant = await make_tenant(client, mosaic)
            admin = tenant.token("subscriptions:admin")
            made = await client.post(
                "/v1/subscriptions",
                json={"url": receiver.url, "event_types": ["run.blocked"]},
                headers=admin,
            )
            subscription: dict[str, Any] = made.json()
            await blocked_run_for(client, tenant, await start_mosaic_run(mosaic, tenant))

            async def delivered() -> bool:
                return len(receiver.received) == 1

            await eventually(delivered, what="the first delivery")
            await all_delivered(client, subscription["id"], admin, 1)
            code, out, err = await unblock(
                stack, "deliveries", "list", "--subscription", subscription["id"]
            )
            assert code == 0, err
            [entry] = rows(out)
            assert (entry["event"], entry["status"], entry["last_status"]) == (
                "run.blocked",
                "delivered",
                "200",
            )
            code, out, err = await unblock(stack, "deliveries", "redeliver", entry["id"])
            assert code == 0, err

            async def twice() -> bool:
                return len(receiver.received) == 2

            await eventually(twice, what="the redelivery")
            ids = {r.headers["webhook-id"] for r in receiver.received}
            assert len(ids) == 1

            # Disabled (here by its admin), visible in the list, enabled by an operator.
            await client.post(f"/v1/subscriptions/{subscription['id']}/disable", headers=admin)
            code, out, _ = await unblock(
                stack, "subscriptions", "list", "--account", tenant.account_id
            )
            [listed] = rows(out)
            assert listed["status"] == "disabled"
            assert "disabled by user:" in listed["disabled_reason"]
            code, out, err = await unblock(
                stack,
                "subscriptions",
                "enable",
                subscription["id"],
                UNBLOCK_NOTIFY_ALLOWED_NETWORKS="127.0.0.1/32",
            )
            assert code == 0, err
            assert out.strip().endswith("active")
            code, _, err = await unblock(stack, "deliveries", "redeliver", "424242")
            assert (code, err.strip()) == (1, "unblock: No such delivery.")
    finally:
        await receiver.stop()
