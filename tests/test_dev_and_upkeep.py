"""`unblock dev` works for a newcomer, and the worker's upkeep expires and prunes."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys

import httpx
import pytest
from sqlalchemy import text

from app import maintenance
from conftest import (
    blocked_run_for,
    eventually,
    free_port,
    fresh_database,
    isolated_stack,
    make_tenant,
    start_mosaic_run,
    wait_for_state,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_unblock_dev_prints_a_working_walkthrough() -> None:
    url = await fresh_database("dev")
    port, sandbox_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UNBLOCK_", "MOSAIC_"))}
    env |= {"DATABASE_URL": url, "UNBLOCK_LOG_LEVEL": "WARNING"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "app",
        "dev",
        "--port",
        str(port),
        "--sandbox-port",
        str(sandbox_port),
        "--runs",
        "2",
        env=env,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        banner = ""
        async with asyncio.timeout(60):
            while "Ctrl-C" not in banner:
                line = await proc.stdout.readline()
                assert line, f"unblock dev stopped early: {banner}"
                banner += line.decode()
        token = re.search(r"export TOKEN=(\S+)", banner)[1]  # type: ignore[index]
        run = re.search(r"Walk run (\S+) through", banner)[1]  # type: ignore[index]
        assert "2 waiting for a plan choice" in banner
        api = f"http://127.0.0.1:{port}"
        # It opens on the web app, signed in through the URL's fragment.
        assert f"{api}/app#token={token}" in banner
        headers = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(base_url=api, headers=headers, timeout=15) as client:
            chosen = await client.post(
                f"/v1/blocked-runs/{run}/choose-plan", json={"plan_id": "creator"}
            )
            checkout = chosen.json()["checkout_url"]
            assert checkout.startswith(f"http://127.0.0.1:{sandbox_port}/")
            async with httpx.AsyncClient() as browser:  # the person on the checkout page
                page = await browser.get(checkout)
                assert page.status_code == 200
                paid = await browser.post(f"{checkout.rstrip('/')}/pay")
                assert paid.status_code < 400
            confirmed = await client.post(f"/v1/blocked-runs/{run}/confirm-checkout")
            assert confirmed.json()["state"] == "topup_prompt"
            answered = await client.post(
                f"/v1/blocked-runs/{run}/topup",
                json={"enable": True, "threshold": 500, "quantity": 2500},
            )
            assert answered.json()["state"] == "resumed"
            page = (await client.get("/v1/blocked-runs")).json()
            assert {i["state"] for i in page["items"]} == {"resumed"}
    finally:
        # Ctrl-C stops the service and the sandbox it started (the sandbox shares our stdout
        # pipe, so wait() returning also shows the sandbox is gone).
        proc.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(proc.wait(), 20)
        except TimeoutError:
            proc.kill()
            raise


async def test_unanswered_runs_expire_and_old_inbox_rows_are_pruned() -> None:
    async with isolated_stack("upkeep", decision_ttl=0.2, webhook_retention=0.2) as stack:
        tenant = await make_tenant(stack.client, stack.mosaic)
        run_id = await start_mosaic_run(stack.mosaic, tenant)
        blocked = await blocked_run_for(stack.client, tenant, run_id)
        await wait_for_state(stack.client, tenant, blocked["id"], "awaiting_choice")
        rt = stack.service.runtime

        async def expired() -> bool:
            await maintenance.maintain(rt)
            answer = await stack.client.get(
                f"/v1/blocked-runs/{blocked['id']}", headers=tenant.headers
            )
            return answer.json()["state"] == "expired"

        await eventually(expired, what="the run to expire")
        async with rt.db.sessions() as session:
            inbox = await session.scalar(text("SELECT count(*) FROM webhook_events"))
        assert inbox == 0
