"""Injected faults: status, rate limit, latency, dropped connections; counts, rates, matching."""

from __future__ import annotations

import time

import httpx
import pytest

from .harness import SandboxDriver
from .mosaic_shapes import PlanAnswer, PlanList, expect, expect_error

pytestmark = pytest.mark.asyncio


async def _fault(sandbox: SandboxDriver, **spec: object) -> dict[str, object]:
    response = await sandbox.control.post("/_sandbox/faults", json=spec)
    assert response.status_code == 201, response.text
    fault: dict[str, object] = response.json()
    return fault


async def test_status_fault_answers_the_next_n_calls(sandbox: SandboxDriver) -> None:
    org = await sandbox.org()
    await _fault(sandbox, method="GET", path="/plan", action="status", status=503, count=2)
    assert expect_error(await org.client.get("/plan"), 503)
    assert expect_error(await org.client.get("/plan"), 503)
    expect(await org.client.get("/plan"), PlanAnswer)
    # Other paths were never affected.
    expect(await org.client.get("/plan/list"), PlanList)
    faults = (await sandbox.control.get("/_sandbox/faults")).json()
    assert [(f["fired"], f["remaining"]) for f in faults] == [(2, 0)]


async def test_rate_limit_answers_429_with_retry_after(sandbox: SandboxDriver) -> None:
    org = await sandbox.org()
    await _fault(sandbox, method="POST", path="/plan/upgrade", action="rate_limit", retry_after=2)
    response = await org.client.post("/plan/upgrade", json={"plan_id": "creator"})
    assert expect_error(response, 429)
    assert response.headers["retry-after"] == "2"
    await sandbox.control.delete("/_sandbox/faults")
    await _fault(sandbox, path="/plan/upgrade", action="rate_limit", retry_after=0.25, count=1)
    response = await org.client.post("/plan/upgrade", json={"plan_id": "creator"})
    assert response.headers["retry-after"] == "0.25"
    # The faulted call never reached the sandbox: the plan did not change.
    assert (await sandbox.state(org))["plan_id"] is None


async def test_latency_delays_then_answers_normally(sandbox: SandboxDriver) -> None:
    org = await sandbox.org()
    await _fault(sandbox, method="GET", path="/credits", action="latency", latency_ms=150, count=1)
    started = time.perf_counter()
    response = await org.client.get("/credits")
    assert response.status_code == 200
    assert time.perf_counter() - started >= 0.15
    started = time.perf_counter()
    await org.client.get("/credits")
    assert time.perf_counter() - started < 0.15


async def test_drop_closes_the_connection_without_an_answer(sandbox: SandboxDriver) -> None:
    org = await sandbox.org()
    await _fault(sandbox, method="POST", path="/agent_run/*/resume", action="drop", count=1)
    with pytest.raises(httpx.RemoteProtocolError):
        await org.client.post("/agent_run/some-run/resume")
    # The next call goes through (and this run does not exist).
    expect_error(await org.client.post("/agent_run/some-run/resume"), 404)
    calls = (await sandbox.control.get("/_sandbox/calls", params={"path": "/agent_run/*"})).json()
    assert [(c["status"], c["fault"]) for c in calls] == [(None, "drop"), (404, None)]


async def test_wildcards_match_paths_and_any_method(sandbox: SandboxDriver) -> None:
    org = await sandbox.org()
    await _fault(sandbox, path="/agent_run/*", action="status", status=502)
    assert expect_error(await org.client.get("/agent_run/abc"), 502)
    assert expect_error(await org.client.post("/agent_run/abc/cancel"), 502)
    assert (await org.client.get("/whoami")).status_code == 200


async def test_faults_come_before_authentication(sandbox: SandboxDriver) -> None:
    await _fault(sandbox, path="/whoami", action="status", status=500, count=1)
    anonymous = sandbox.client(None)
    assert expect_error(await anonymous.get("/whoami"), 500)
    assert expect_error(await anonymous.get("/whoami"), 401)


async def test_control_and_checkout_paths_are_never_faulted(sandbox: SandboxDriver) -> None:
    await _fault(sandbox, path="*", action="status", status=500)
    assert (await sandbox.control.get("/_sandbox/orgs")).status_code == 200
    assert (await sandbox.control.get("/checkout/chk_missing")).status_code == 404


async def _pattern(sandbox: SandboxDriver, calls: int) -> list[int]:
    org = await sandbox.org()
    await _fault(sandbox, path="/whoami", action="status", status=500, rate=0.5)
    return [(await org.client.get("/whoami")).status_code for _ in range(calls)]


async def test_fault_rate_is_seeded_and_repeatable(sandbox: SandboxDriver) -> None:
    first = await _pattern(sandbox, 40)
    assert set(first) == {200, 500}
    assert 8 <= first.count(500) <= 32
    await sandbox.control.post("/_sandbox/reset")
    assert await _pattern(sandbox, 40) == first
    await sandbox.control.post("/_sandbox/reset", json={"seed": 12345})
    assert await _pattern(sandbox, 40) != first


async def test_faults_can_be_listed_removed_and_cleared(sandbox: SandboxDriver) -> None:
    first = await _fault(sandbox, path="/plan", action="status")
    await _fault(sandbox, path="/credits", action="latency", latency_ms=1)
    listed = (await sandbox.control.get("/_sandbox/faults")).json()
    assert [(f["path"], f["status"], f["rate"], f["remaining"]) for f in listed] == [
        ("/plan", 500, 1.0, None),
        ("/credits", 500, 1.0, None),
    ]
    removed = await sandbox.control.delete(f"/_sandbox/faults/{first['id']}")
    assert removed.status_code == 204
    assert len((await sandbox.control.get("/_sandbox/faults")).json()) == 1
    assert (await sandbox.control.delete("/_sandbox/faults")).status_code == 204
    assert (await sandbox.control.get("/_sandbox/faults")).json() == []


@pytest.mark.parametrize(
    "spec",
    [
        {"path": "/plan", "action": "explode"},
        {"path": "/plan", "action": "status", "status": 200},
        {"path": "/plan", "action": "status", "rate": 1.5},
        {"path": "/plan", "action": "status", "count": 0},
        {"action": "drop"},
        {"path": "/plan", "action": "drop", "typo": True},
    ],
)
async def test_bad_fault_specs_are_422(sandbox: SandboxDriver, spec: dict[str, object]) -> None:
    response = await sandbox.control.post("/_sandbox/faults", json=spec)
    assert response.status_code == 422
