"""Hanging answers and lost answers: Mosaic did the work, the caller never heard."""

from __future__ import annotations

import time

import httpx
import pytest

from .harness import SandboxDriver
from .mosaic_shapes import expect_error

pytestmark = pytest.mark.asyncio


async def _fault(sandbox: SandboxDriver, **spec: object) -> dict[str, object]:
    response = await sandbox.control.post("/_sandbox/faults", json=spec)
    assert response.status_code == 201, response.text
    fault: dict[str, object] = response.json()
    return fault


async def _calls(sandbox: SandboxDriver, path: str) -> list[dict[str, object]]:
    calls: list[dict[str, object]] = (
        await sandbox.control.get("/_sandbox/calls", params={"path": path})
    ).json()
    return calls


async def test_lost_answer_applies_the_upgrade_then_answers_503(sandbox: SandboxDriver) -> None:
    org = await sandbox.org()
    fault = await _fault(
        sandbox, path="/plan/upgrade", action="status", status=503, lost_answer=True, count=1
    )
    assert fault["lost_answer"] is True
    assert expect_error(await org.client.post("/plan/upgrade", json={"plan_id": "creator"}), 503)
    state = await sandbox.state(org)
    assert state["plan_id"] == "creator"
    calls = await _calls(sandbox, "/plan/upgrade")
    assert [(c["status"], c["applied_status"], c["fault"]) for c in calls] == [(503, 200, "status")]


async def test_lost_answer_with_drop_writes_settings_and_closes(sandbox: SandboxDriver) -> None:
    org = await sandbox.org(plan_id="creator", balance=5000)
    await _fault(sandbox, path="/credits/settings", action="drop", lost_answer=True, count=1)
    body = {"auto_topup": {"enabled": True, "threshold": 100, "quantity": 1000}}
    with pytest.raises(httpx.RemoteProtocolError):
        await org.client.post("/credits/settings", json=body)
    assert (await sandbox.state(org))["auto_topup"]["enabled"] is True
    calls = await _calls(sandbox, "/credits/settings")
    assert [(c["status"], c["applied_status"]) for c in calls] == [(None, 200)]


async def test_ordinary_faults_never_reach_the_sandbox(sandbox: SandboxDriver) -> None:
    org = await sandbox.org()
    await _fault(sandbox, path="/plan/upgrade", action="status", status=500, count=1)
    expect_error(await org.client.post("/plan/upgrade", json={"plan_id": "creator"}), 500)
    assert (await sandbox.state(org))["plan_id"] is None
    calls = await _calls(sandbox, "/plan/upgrade")
    assert [(c["status"], c["applied_status"]) for c in calls] == [(500, None)]


async def test_hang_outlasts_the_client_timeout_and_is_logged(sandbox: SandboxDriver) -> None:
    org = await sandbox.org()
    await _fault(sandbox, method="GET", path="/plan", action="hang", latency_ms=60_000, count=1)
    started = time.perf_counter()
    with pytest.raises(httpx.ReadTimeout):
        await org.client.get("/plan", timeout=0.3)
    # The caller's own timeout ended it, not the fault's minute.
    assert time.perf_counter() - started < 5
    assert (await org.client.get("/plan")).status_code == 200
    calls = await _calls(sandbox, "/plan")
    assert [(c["status"], c["fault"]) for c in calls] == [(None, "hang"), (200, None)]


async def test_hang_with_lost_answer_buys_and_then_times_out(sandbox: SandboxDriver) -> None:
    org = await sandbox.org()
    await _fault(
        sandbox, path="/plan/upgrade", action="hang", latency_ms=200, lost_answer=True, count=1
    )
    with pytest.raises(httpx.RemoteProtocolError):
        # The hang is shorter than the timeout here, so the connection closes unanswered.
        await org.client.post("/plan/upgrade", json={"plan_id": "professional"}, timeout=10)
    assert (await sandbox.state(org))["plan_id"] == "professional"


async def test_rate_per_endpoint_fires_about_that_often(sandbox: SandboxDriver) -> None:
    org = await sandbox.org()
    await _fault(sandbox, method="GET", path="/credits", action="status", status=502, rate=0.3)
    await _fault(sandbox, method="GET", path="/plan", action="status", status=502, rate=0.0)
    statuses = [(await org.client.get("/credits")).status_code for _ in range(200)]
    assert 30 <= statuses.count(502) <= 90
    assert {(await org.client.get("/plan")).status_code for _ in range(20)} == {200}


async def test_lost_answer_cannot_be_latency(sandbox: SandboxDriver) -> None:
    response = await sandbox.control.post(
        "/_sandbox/faults", json={"path": "/plan", "action": "latency", "lost_answer": True}
    )
    assert response.status_code == 422
