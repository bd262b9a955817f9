"""`unblock dev`: a newcomer's first run, on one machine, with nothing set up beforehand."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import secrets
import signal
import socket
import sys
from typing import Any

import httpx
import uvicorn

from app import migrations
from app.auth import mint_token
from app.database import resolve_database_url
from app.settings import DEV_ENCRYPTION_KEY, DEV_JWT_SECRET, Settings
from app.startup import Server

DEMO_AGENT = "agent-demo-video-edit"


def dev_settings(port: int, sandbox_port: int) -> Settings:
    """Dev defaults; anything set in the environment (DATABASE_URL, say) still wins."""
    defaults = {
        "UNBLOCK_ENV": "dev",
        "UNBLOCK_JWT_SECRET": DEV_JWT_SECRET,
        "UNBLOCK_ENCRYPTION_KEY": DEV_ENCRYPTION_KEY,
        "UNBLOCK_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "MOSAIC_BASE_URL": f"http://127.0.0.1:{sandbox_port}",
        "UNBLOCK_ACTION_DEADLINE": "5",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    return Settings()


async def _wait_until_up(url: str, proc: asyncio.subprocess.Process) -> None:
    async with httpx.AsyncClient() as client:
        for _ in range(200):
            if proc.returncode is not None:
                raise RuntimeError(f"the sandbox exited with {proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(f"{url}/_sandbox/calls")).status_code == 200:
                    return
            await asyncio.sleep(0.1)
    raise RuntimeError(f"the sandbox did not come up at {url}")


async def make_demo(settings: Settings, sandbox_url: str, runs: int) -> dict[str, Any]:
    """A free organization in the sandbox, its unblock account, and blocked runs (real webhooks)."""
    webhook_secret = "whsec_demo_" + secrets.token_hex(8)
    admin = mint_token(DEV_JWT_SECRET, sub="dev-admin", scopes=["accounts:admin"])
    async with httpx.AsyncClient(timeout=10) as client:
        org = (
            (
                await client.post(
                    f"{sandbox_url}/_sandbox/orgs",
                    json={
                        "plan_id": None,
                        "balance": 0,
                        "checkout": True,
                        "webhook_secret": webhook_secret,
                        "name": "Demo Productions",
                    },
                )
            )
            .raise_for_status()
            .json()
        )
        account = (
            (
                await client.post(
                    f"{settings.public_url}/v1/accounts",
                    headers={"Authorization": f"Bearer {admin}"},
                    json={
                        "name": "Demo Productions",
                        "mosaic_api_key": org["api_key"],
                        "webhook_secret": webhook_secret,
                    },
                )
            )
            .raise_for_status()
            .json()
        )
        for n in range(runs):
            await client.post(
                f"{sandbox_url}/agent/{DEMO_AGENT}/run",
                headers={"Authorization": f"Bearer {org['api_key']}"},
                json={
                    "video_urls": [f"https://example.com/demo-{n}.mp4"],
                    "callback_url": account["webhook_url"],
                },
            )
        token = mint_token(
            DEV_JWT_SECRET,
            sub="dev-user",
            account_id=account["id"],
            scopes=["runs:read", "runs:write", "runs:register"],
            ttl_seconds=7 * 24 * 3600,
        )
        headers = {"Authorization": f"Bearer {token}"}
        blocked: list[dict[str, Any]] = []
        for _ in range(300):  # the runs block once their first node finds no credits
            page = await client.get(
                f"{settings.public_url}/v1/blocked-runs",
                params={"state": "awaiting_choice"},
                headers=headers,
            )
            blocked = page.json()["items"]
            if len(blocked) >= runs:
                break
            await asyncio.sleep(0.1)
    return {"account": account, "org": org, "token": token, "blocked": blocked}


def app_url(api: str, token: str) -> str:
    """The web app, signed in: the token rides in the fragment, which no server ever sees."""
    return f"{api}/app#token={token}"


def banner(settings: Settings, sandbox_url: str, demo: dict[str, Any]) -> str:
    api = settings.public_url
    token = demo["token"]
    first = demo["blocked"][0]["id"] if demo["blocked"] else "<id>"
    return f"""
unblock dev is running. Open the web app (signed in as the demo organization's person):

  {app_url(api, token)}

  API            {api}            (docs: {api}/docs)
  Mosaic sandbox {sandbox_url}    (calls it received: {sandbox_url}/_sandbox/calls)
  Account        {demo["account"]["id"]}
  Blocked runs   {len(demo["blocked"])} waiting for a plan choice

User token (runs:read runs:write runs:register, valid 7 days):
  export TOKEN={token}

Walk run {first} through the flow with curl instead:
  curl -s {api}/v1/blocked-runs -H "Authorization: Bearer $TOKEN"
  curl -s -X POST {api}/v1/blocked-runs/{first}/choose-plan -H "Authorization: Bearer $TOKEN" \\
       -H 'Content-Type: application/json' -d '{{"plan_id": "creator"}}'
  # open the checkout_url from that answer in a browser and press Pay, then:
  curl -s -X POST {api}/v1/blocked-runs/{first}/confirm-checkout -H "Authorization: Bearer $TOKEN"
  curl -s -X POST {api}/v1/blocked-runs/{first}/topup -H "Authorization: Bearer $TOKEN" \\
  -H 'Content-Type: application/json' -d '{{"enable": true, "threshold": 500, "quantity": 2500}}'
  curl -s {api}/v1/blocked-runs/{first} -H "Authorization: Bearer $TOKEN"
  curl -N {api}/v1/blocked-runs/{first}/events -H "Authorization: Bearer $TOKEN"   # live

The other runs of the organization move on with the same decisions. Ctrl-C stops everything.
"""


async def run_dev(*, sock: socket.socket, sandbox_port: int, runs: int) -> None:
    """Everything `unblock dev` runs, until a signal stops uvicorn; then all of it stops."""
    from app.main import create_app

    port = sock.getsockname()[1]
    settings = dev_settings(port, sandbox_port)
    database_url = resolve_database_url(settings)
    migrations.upgrade(database_url)
    sandbox_url = settings.mosaic_base_url
    sandbox = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mosaic_sandbox",
        "--host",
        "127.0.0.1",
        "--port",
        str(sandbox_port),
        "--step-delay",
        "0.2",
        preexec_fn=_die_with_parent,
    )
    server = Server(
        uvicorn.Config(
            create_app(settings, database_url=database_url),
            log_config=None,
            log_level="warning",  # the banner is what a newcomer reads; no access log under it
        )
    )
    # uvicorn owns SIGINT/SIGTERM here: when it stops serving, everything stops.
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await _wait_until_up(sandbox_url, sandbox)
        while not server.started:
            if serving.done():
                await serving
                raise RuntimeError("the service stopped while starting")
            await asyncio.sleep(0.05)
        demo = await make_demo(settings, sandbox_url, runs)
        print(banner(settings, sandbox_url, demo), flush=True)
        await serving
    finally:
        # Stop the sandbox first, without awaiting: on Ctrl-C this block runs while the task is
        # being cancelled, and a sandbox left behind keeps retrying webhooks to a dead service.
        if sandbox.returncode is None:
            sandbox.terminate()
        server.should_exit = True
        with contextlib.suppress(Exception):
            await serving
        try:
            await asyncio.wait_for(sandbox.wait(), 3)
        except TimeoutError:
            sandbox.kill()


def _die_with_parent() -> None:
    """Linux: the sandbox gets SIGTERM if `unblock dev` dies without cleaning up."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
