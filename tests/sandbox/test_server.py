"""The ways to run a sandbox: the app factory, SandboxServer (sync and async), the CLI."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from mosaic_sandbox import SandboxServer, create_app
from mosaic_sandbox.cli import build_parser


def test_sync_server_runs_in_a_background_thread() -> None:
    with SandboxServer(step_delay=0.01) as server:
        assert server.url.startswith("http://127.0.0.1:")
        created = httpx.post(f"{server.url}/_sandbox/orgs", json={"plan_id": "creator"})
        assert created.status_code == 201
        key = created.json()["api_key"]
        plan = httpx.get(f"{server.url}/plan", headers={"Authorization": f"Bearer {key}"})
        assert plan.json()["plan"]["id"] == "creator"
        assert server.app.state.sandbox.organizations
        url = server.url
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/plan/list")


@pytest.mark.asyncio
async def test_each_app_has_its_own_state() -> None:
    async with SandboxServer(seed=7) as one, SandboxServer(seed=7) as two:
        assert one.url != two.url
        async with httpx.AsyncClient() as client:
            await client.post(f"{one.url}/_sandbox/orgs", json={})
            assert len((await client.get(f"{one.url}/_sandbox/orgs")).json()) == 1
            assert (await client.get(f"{two.url}/_sandbox/orgs")).json() == []
    assert create_app().state.sandbox is not create_app().state.sandbox


def test_factory_refuses_nonsense_settings() -> None:
    with pytest.raises(ValueError, match="webhook_max_attempts"):
        create_app(webhook_max_attempts=0)
    with pytest.raises(ValueError, match="step_delay"):
        create_app(step_delay=-1)


def test_cli_flags() -> None:
    args = build_parser().parse_args(
        ["--host", "0.0.0.0", "--port", "9999", "--seed", "3", "--step-delay", "0.5"]
    )
    assert (args.host, args.port, args.seed, args.step_delay) == ("0.0.0.0", 9999, 3, 0.5)


def test_python_dash_m_serves_the_installed_sandbox_from_anywhere(tmp_path: Path) -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mosaic_sandbox",
            "--port",
            str(port),
            "--seed",
            "5",
            "--log-level",
            "warning",
        ],
        cwd=tmp_path,  # the distribution in sandbox/, installed (make install), not the checkout
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/_sandbox/orgs")
                break
            except httpx.TransportError:
                assert process.poll() is None, "sandbox process exited"
                assert time.monotonic() < deadline, "sandbox did not start"
                # A separate process: nothing to await but its port opening.
                time.sleep(0.05)
        assert response.json() == []
    finally:
        process.terminate()
        process.wait(timeout=10)
