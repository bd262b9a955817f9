"""The blocked-runs API as a client sees it: listing, reading, refusing, streaming, operating."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.main import openapi_document
from conftest import (
    Tenant,
    assert_problem,
    blocked_run_for,
    finished_event,
    make_tenant,
    wait_for_state,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")

OPENAPI_FILE = Path(__file__).resolve().parent.parent / "openapi" / "openapi.json"


async def block_run(client: httpx.AsyncClient, tenant: Tenant) -> str:
    """Mosaic reports a credit-blocked run; returns its (made-up) Mosaic run id."""
    run_id = f"run-{uuid.uuid4()}"
    answer = await client.post(
        f"/v1/webhooks/mosaic/{tenant.account_id}",
        json=finished_event(run_id),
        headers={"X-Mosaic-Signature": tenant.webhook_secret},
    )
    assert answer.status_code == 202, answer.text
    assert answer.json()["status"] == "accepted"
    return run_id


async def awaiting_choice(client: httpx.AsyncClient, tenant: Tenant) -> dict[str, Any]:
    """A blocked run of a free organization, waiting for a person to choose a plan."""
    blocked = await blocked_run_for(client, tenant, await block_run(client, tenant))
    return await wait_for_state(client, tenant, blocked["id"], "awaiting_choice")


async def listing(
    client: httpx.AsyncClient, tenant: Tenant, **params: Any
) -> tuple[list[dict[str, Any]], str | None]:
    answer = await client.get("/v1/blocked-runs", params=params, headers=tenant.headers)
    assert answer.status_code == 200, answer.text
    page = answer.json()
    assert set(page) == {"items", "next_cursor"}
    return page["items"], page["next_cursor"]


# --- GET /v1/blocked-runs -------------------------------------------------------------------


async def test_the_list_pages_newest_first_with_a_cursor(
    client: httpx.AsyncClient, mosaic: httpx.AsyncClient
) -> None:
    tenant = await make_tenant(client, mosaic)
    reported = [await block_run(client, tenant) for _ in range(7)]

    pages: list[list[dict[str, Any]]] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 3} | ({"cursor": cursor} if cursor else {})
        items, cursor = await listing(client, tenant, **params)
        pages.append(items)
        if cursor is None:
            break
        assert len(pages) < 5, "pagination does not end"

    assert [len(p) for p in pages] == [3, 3, 1]
    seen = [item["run_id"] for page in pages for item in page]
    assert seen == list(reversed(reported))
    assert len({item["id"] for page in pages for item in page}) == 7
    created = [item["created_at"] for page in pages for item in page]
    assert created == sorted(created, reverse=True)
    assert all(item["history"] is None for page in pages for item in page)
    assert all(item["account_id"] == tenant.account_id for page in pages for item in page)

    # Exactly a page's worth: no empty page behind a cursor.
    items, cursor = await listing(client, tenant, limit=7)
    assert len(items) == 7
    assert cursor is None
    # A run reported after the first page was read does not disturb the pages that follow.
    first, cursor = await listing(client, tenant, limit=3)
    await block_run(client, tenant)
    second, _ = await listing(client, tenant, limit=3, cursor=cursor)
    assert [i["run_id"] for i in first + second] == list(reversed(reported))[:6]


async def test_the_list_filters_by_state_and_by_run_id(
    client: httpx.AsyncClient, mosaic: httpx.AsyncClient
) -> None:
    tenant = await make_tenant(client, mosaic)
    waiting = [await awaiting_choice(client, tenant) for _ in range(3)]
    cancelled = await client.post(
        f"/v1/blocked-runs/{waiting[0]['id']}/cancel", headers=tenant.headers
    )
    assert cancelled.status_code == 200

    def ids(items: list[dict[str, Any]]) -> set[str]:
        return {item["id"] for item in items}

    items, _ = await listing(client, tenant, state="cancelled")
    assert ids(items) == {waiting[0]["id"]}
    items, _ = await listing(client, tenant, state="awaiting_choice")
    assert ids(items) == {waiting[1]["id"], waiting[2]["id"]}
    items, _ = await listing(client, tenant, state="awaiting_choice,cancelled")
    assert ids(items) == ids(waiting)
    items, _ = await listing(client, tenant, state=" cancelled , resumed ")
    assert ids(items) == {waiting[0]["id"]}
    items, _ = await listing(client, tenant, state="resumed,failed")
    assert items == []

    items, _ = await listing(client, tenant, run_id=waiting[1]["run_id"])
    assert ids(items) == {waiting[1]["id"]}
    items, _ = await listing(client, tenant, run_id=waiting[1]["run_id"], state="cancelled")
    assert items == []
    items, _ = await listing(client, tenant, run_id="run-that-never-blocked")
    assert items == []


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"state": "stuck"}, "invalid_state_filter"),
        ({"state": "awaiting_choice,AWAITING_CHOICE"}, "invalid_state_filter"),
        ({"cursor": "not a cursor!"}, "invalid_cursor"),
        ({"cursor": base64.urlsafe_b64encode(b"yesterday|someone").decode()}, "invalid_cursor"),
        ({"cursor": base64.urlsafe_b64encode(b"a|b|c").decode()}, "invalid_cursor"),
        ({"cursor": "AAAA"}, "invalid_cursor"),
        ({"limit": 0}, "validation_error"),
        ({"limit": 1000}, "validation_error"),
        ({"limit": -1}, "validation_error"),
        ({"limit": "ten"}, "validation_error"),
        ({"run_id": "r" * 201}, "validation_error"),
    ],
)
async def test_bad_list_parameters_are_422_problem_json(
    client: httpx.AsyncClient, tenant: Tenant, params: dict[str, Any], code: str
) -> None:
    answer = await client.get("/v1/blocked-runs", params=params, headers=tenant.headers)
    assert_problem(answer, 422, code)


async def test_a_forged_cursor_with_a_valid_shape_is_answered_not_crashed(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    await awaiting_choice(client, tenant)
    for raw in (f"2000-01-01T00:00:00+00:00|{uuid.uuid4()}", f"2999-01-01T00:00:00|{uuid.uuid4()}"):
        cursor = base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")
        answer = await client.get(
            "/v1/blocked-runs", params={"cursor": cursor}, headers=tenant.headers
        )
        assert answer.status_code in (200, 422), answer.text
        if answer.status_code == 422:
            assert answer.json()["code"] == "invalid_cursor"
    old = base64.urlsafe_b64encode(f"2000-01-01T00:00:00+00:00|{uuid.uuid4()}".encode()).decode()
    items, cursor = await listing(client, tenant, cursor=old.rstrip("="))
    assert items == []
    assert cursor is None


# --- GET /v1/blocked-runs/{id} --------------------------------------------------------------


async def test_a_single_read_carries_the_history(
    client: httpx.AsyncClient, mosaic: httpx.AsyncClient
) -> None:
    tenant = await make_tenant(client, mosaic)
    run = await awaiting_choice(client, tenant)
    answer = await client.get(f"/v1/blocked-runs/{run['id']}", headers=tenant.headers)
    assert answer.status_code == 200
    body = answer.json()
    assert body.keys() >= {
        "id",
        "account_id",
        "run_id",
        "agent_id",
        "state",
        "pending",
        "actions",
        "plan",
        "plans",
        "chosen_plan_id",
        "checkout_url",
        "topup",
        "error",
        "version",
        "created_at",
        "updated_at",
        "history",
    }
    assert body["agent_id"] == "agent-7"
    assert body["state"] == "awaiting_choice"
    assert body["actions"] == ["choose_plan", "cancel"]
    history = body["history"]
    assert [set(h) for h in history] == [
        {"from_state", "to_state", "event", "actor", "reason", "at"}
    ] * 2
    assert [(h["from_state"], h["to_state"], h["event"], h["actor"]) for h in history] == [
        (None, "checking_plan", "blocked", "mosaic"),
        ("checking_plan", "awaiting_choice", "plan_free", "system"),
    ]
    assert "RUN_FINISHED" in history[0]["reason"]
    assert history[0]["at"] <= history[1]["at"]

    listed, _ = await listing(client, tenant, run_id=run["run_id"])
    assert listed[0]["history"] is None
    assert {k: v for k, v in listed[0].items() if k != "history"} == {
        k: v for k, v in body.items() if k != "history"
    }


async def test_an_unknown_or_malformed_id_is_404_or_422(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    assert_problem(
        await client.get(f"/v1/blocked-runs/{uuid.uuid4()}", headers=tenant.headers),
        404,
        "blocked_run_not_found",
    )
    assert_problem(
        await client.get("/v1/blocked-runs/not-a-uuid", headers=tenant.headers),
        422,
        "validation_error",
    )


# --- Actions refused --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("action", "body"),
    [("topup", {"enable": False}), ("confirm-checkout", None), ("retry", None)],
)
async def test_an_action_the_state_does_not_offer_is_409_naming_the_state(
    client: httpx.AsyncClient, mosaic: httpx.AsyncClient, action: str, body: dict[str, Any] | None
) -> None:
    tenant = await make_tenant(client, mosaic)
    run = await awaiting_choice(client, tenant)
    answer = await client.post(
        f"/v1/blocked-runs/{run['id']}/{action}", json=body, headers=tenant.headers
    )
    problem = assert_problem(answer, 409, "invalid_state")
    assert problem["state"] == "awaiting_choice"
    after = (await client.get(f"/v1/blocked-runs/{run['id']}", headers=tenant.headers)).json()
    assert after["state"] == "awaiting_choice"
    assert after["version"] == run["version"]


async def test_choosing_a_plan_is_refused_once_the_plan_is_paid(
    client: httpx.AsyncClient, mosaic: httpx.AsyncClient
) -> None:
    tenant = await make_tenant(client, mosaic, plan_id="creator")
    blocked = await blocked_run_for(client, tenant, await block_run(client, tenant))
    run = await wait_for_state(client, tenant, blocked["id"], "topup_prompt")
    answer = await client.post(
        f"/v1/blocked-runs/{run['id']}/choose-plan",
        json={"plan_id": "professional"},
        headers=tenant.headers,
    )
    problem = assert_problem(answer, 409, "invalid_state")
    assert problem["state"] == "topup_prompt"


async def test_a_plan_that_was_not_offered_is_422(
    client: httpx.AsyncClient, mosaic: httpx.AsyncClient
) -> None:
    tenant = await make_tenant(client, mosaic)
    run = await awaiting_choice(client, tenant)
    answer = await client.post(
        f"/v1/blocked-runs/{run['id']}/choose-plan",
        json={"plan_id": "platinum-unlimited"},
        headers=tenant.headers,
    )
    problem = assert_problem(answer, 422, "plan_not_offered")
    assert "platinum-unlimited" in problem["detail"]
    after = (await client.get(f"/v1/blocked-runs/{run['id']}", headers=tenant.headers)).json()
    assert after["state"] == "awaiting_choice"
    assert after["chosen_plan_id"] is None


@pytest.mark.parametrize(
    ("action", "body"),
    [
        ("topup", {"enable": True, "threshold": -1, "quantity": 100}),
        ("topup", {"enable": True, "threshold": 100, "quantity": 1_000_001}),
        ("topup", {"enable": True, "threshold": 1_000_001, "quantity": 100}),
        ("topup", {"enable": True, "threshold": "100", "quantity": 100}),
        ("topup", {"enable": True, "threshold": 100.5, "quantity": 100}),
        ("topup", {"enable": True, "threshold": 100}),
        ("topup", {"enable": True}),
        ("topup", {"threshold": 100, "quantity": 100}),
        ("topup", {"enable": False, "surprise": 1}),
        ("topup", None),
        ("choose-plan", {"plan_id": "creator", "coupon": "FREE"}),
        ("choose-plan", {"plan_id": ""}),
        ("choose-plan", {}),
    ],
)
async def test_bad_action_input_is_422_and_changes_nothing(
    client: httpx.AsyncClient, mosaic: httpx.AsyncClient, action: str, body: Any
) -> None:
    tenant = await make_tenant(client, mosaic)
    run = await awaiting_choice(client, tenant)
    answer = await client.post(
        f"/v1/blocked-runs/{run['id']}/{action}", json=body, headers=tenant.headers
    )
    assert_problem(answer, 422, "validation_error")
    after = (await client.get(f"/v1/blocked-runs/{run['id']}", headers=tenant.headers)).json()
    assert after["version"] == run["version"]


async def test_registering_with_unknown_fields_or_a_blank_run_id_is_422(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    for body in ({"run_id": "run-1", "priority": "high"}, {"run_id": ""}, {"run_id": "a b"}, {}):
        answer = await client.post("/v1/blocked-runs", json=body, headers=tenant.service_headers)
        assert_problem(answer, 422, "validation_error")


# --- Cancel -----------------------------------------------------------------------------------


async def test_cancel_ends_the_run_once(
    client: httpx.AsyncClient, mosaic: httpx.AsyncClient
) -> None:
    tenant = await make_tenant(client, mosaic)
    run = await awaiting_choice(client, tenant)
    url = f"/v1/blocked-runs/{run['id']}"
    headers = tenant.token("runs:read", "runs:write", sub="dana")
    answer = await client.post(f"{url}/cancel", headers=headers)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["state"] == "cancelled"
    assert body["actions"] == []
    assert body["pending"] is False
    assert body["version"] > run["version"]

    detail = (await client.get(url, headers=headers)).json()
    last = detail["history"][-1]
    assert (last["from_state"], last["to_state"]) == ("awaiting_choice", "cancelled")
    assert last["actor"] == "user:dana"
    assert last["event"] == "cancel"

    again = await client.post(f"{url}/cancel", headers=headers)
    problem = assert_problem(again, 409, "invalid_state")
    assert problem["state"] == "cancelled"
    for action, action_body in (("choose-plan", {"plan_id": "creator"}), ("retry", None)):
        refused = await client.post(f"{url}/{action}", json=action_body, headers=headers)
        assert assert_problem(refused, 409, "invalid_state")["state"] == "cancelled"
    assert len((await client.get(url, headers=headers)).json()["history"]) == len(detail["history"])


# --- The event stream -------------------------------------------------------------------------


async def read_events(stream: httpx.Response) -> Any:
    """Yield the server-sent events of `stream` as dicts (event, data, id), pings skipped."""
    event: dict[str, str] = {}
    async for line in stream.aiter_lines():
        if line == "":
            if "data" in event:
                yield event
            event = {}
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            event[name] = value.removeprefix(" ")


async def test_the_event_stream_starts_with_the_run_and_ends_when_it_is_terminal(
    client: httpx.AsyncClient, mosaic: httpx.AsyncClient
) -> None:
    tenant = await make_tenant(client, mosaic)
    run = await awaiting_choice(client, tenant)
    url = f"/v1/blocked-runs/{run['id']}"

    async def follow() -> list[dict[str, str]]:
        seen: list[dict[str, str]] = []
        async with client.stream("GET", f"{url}/events", headers=tenant.headers) as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
            async for event in read_events(stream):
                seen.append(event)
                if len(seen) == 1:
                    cancelled = await client.post(f"{url}/cancel", headers=tenant.headers)
                    assert cancelled.status_code == 200
        return seen

    seen = await asyncio.wait_for(follow(), 20)
    first = seen[0]
    assert first["event"] == "state"
    now = json.loads(first["data"])
    assert now["id"] == run["id"]
    assert now["state"] == "awaiting_choice"
    assert now["version"] == run["version"]
    assert first["id"] == str(run["version"])
    assert now["actions"] == ["choose_plan", "cancel"]

    last = json.loads(seen[-1]["data"])
    assert seen[-1]["event"] == "state"
    assert last["state"] == "cancelled"
    assert last["actions"] == []
    assert int(seen[-1]["id"]) > run["version"]


async def test_the_event_stream_of_a_finished_run_sends_one_event_and_ends(
    client: httpx.AsyncClient, mosaic: httpx.AsyncClient
) -> None:
    tenant = await make_tenant(client, mosaic)
    run = await awaiting_choice(client, tenant)
    url = f"/v1/blocked-runs/{run['id']}"
    assert (await client.post(f"{url}/cancel", headers=tenant.headers)).status_code == 200

    async def follow() -> list[dict[str, str]]:
        async with client.stream("GET", f"{url}/events", headers=tenant.headers) as stream:
            return [event async for event in read_events(stream)]

    seen = await asyncio.wait_for(follow(), 10)
    assert len(seen) == 1
    assert json.loads(seen[0]["data"])["state"] == "cancelled"


# --- Operations -------------------------------------------------------------------------------


def sample(metrics: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in metrics.splitlines():
        match = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if match and ",".join(sorted(match.group(1).split(","))) == wanted:
            return float(match.group(2))
    return 0.0


async def test_health_readiness_and_metrics(client: httpx.AsyncClient, tenant: Tenant) -> None:
    healthz = await client.get("/healthz")
    assert healthz.status_code == 200
    assert healthz.json() == {"status": "ok"}
    readyz = await client.get("/readyz")
    assert readyz.status_code == 200
    assert readyz.json() == {"status": "ok"}

    before = (await client.get("/metrics")).text
    await block_run(client, tenant)
    answer = await client.get("/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    after = answer.text
    assert "unblock_webhooks_total" in after
    assert "unblock_transitions_total" in after
    accepted = {"outcome": "accepted"}
    assert sample(after, "unblock_webhooks_total", **accepted) >= (
        sample(before, "unblock_webhooks_total", **accepted) + 1
    )
    opened = {"from_state": "", "to_state": "checking_plan"}
    assert sample(after, "unblock_transitions_total", **opened) >= (
        sample(before, "unblock_transitions_total", **opened) + 1
    )


async def test_an_unknown_route_or_method_is_problem_json(client: httpx.AsyncClient) -> None:
    assert_problem(await client.get("/v1/nothing-here"), 404, "not_found")
    assert_problem(await client.get("/v2/blocked-runs"), 404, "not_found")
    assert_problem(await client.delete("/healthz"), 405, "method_not_allowed")


async def test_the_committed_openapi_document_is_current() -> None:
    committed = json.loads(OPENAPI_FILE.read_text())
    assert committed == json.loads(json.dumps(openapi_document())), (
        "openapi/openapi.json is stale: run `unblock openapi > openapi/openapi.json`"
    )
    paths = committed["paths"]
    for path in (
        "/v1/accounts",
        "/v1/accounts/{account_id}",
        "/v1/webhooks/mosaic/{account_id}",
        "/v1/blocked-runs",
        "/v1/blocked-runs/{blocked_run_id}",
        "/v1/blocked-runs/{blocked_run_id}/choose-plan",
        "/v1/blocked-runs/{blocked_run_id}/confirm-checkout",
        "/v1/blocked-runs/{blocked_run_id}/topup",
        "/v1/blocked-runs/{blocked_run_id}/cancel",
        "/v1/blocked-runs/{blocked_run_id}/retry",
        "/v1/blocked-runs/{blocked_run_id}/events",
        "/healthz",
        "/readyz",
        "/metrics",
    ):
        assert path in paths, path
