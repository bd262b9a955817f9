"""Outbound notifications end to end: a test service subscribes, receives every event of a flow
signed per Standard Webhooks, survives its own downtime, and cannot point unblock inward."""

from __future__ import annotations

import ipaddress
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
from sqlalchemy import text

from app.blocked_runs import repository
from app.blocked_runs.state_machine import Event, release, transition
from app.subscriptions import destination
from conftest import (
    ADMIN,
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
from notification_receiver import Receiver, all_delivered, verify

pytestmark = pytest.mark.asyncio(loop_scope="session")

ALL_EVENTS = [
    "run.blocked",
    "decision.needed",
    "run.resumed",
    "run.failed",
    "run.expired",
    "run.cancelled",
]
FAST_RETRIES = {
    "notify_allowed_networks": "127.0.0.1/32",
    "notify_retry_base": 0.05,
    "notify_retry_max": 0.3,
    "notify_timeout": 2,
}


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def stack() -> AsyncIterator[Stack]:
    async with isolated_stack("notify", **FAST_RETRIES) as made:
        yield made


@pytest_asyncio.fixture(loop_scope="session")
async def receiver() -> AsyncIterator[Receiver]:
    made = Receiver(free_port())
    await made.start()
    yield made
    if made._server is not None:
        await made.stop()


async def subscribe(
    client: httpx.AsyncClient, tenant: Tenant, url: str, events: list[str] | None = None
) -> dict[str, Any]:
    answer = await client.post(
        "/v1/subscriptions",
        json={"url": url, "event_types": events or ALL_EVENTS},
        headers=tenant.token("subscriptions:admin", sub="billing-svc-admin"),
    )
    assert answer.status_code == 201, answer.text
    created: dict[str, Any] = answer.json()
    assert created["secret"].startswith("whsec_")
    return created


async def received_count(receiver: Receiver, n: int, what: str, timeout: float = 15) -> None:
    async def enough() -> bool:
        return len(receiver.received) >= n

    await eventually(enough, timeout=timeout, what=what)


async def test_a_subscriber_receives_every_event_of_a_flow_exactly_as_signed(
    stack: Stack, receiver: Receiver
) -> None:
    client, mosaic = stack.client, stack.mosaic
    tenant = await make_tenant(client, mosaic, checkout=False)
    subscription = await subscribe(client, tenant, receiver.url)
    secret = subscription["secret"]
    # The secret is shown once: never in a read or a list.
    admin = tenant.token("subscriptions:admin")
    read = (await client.get(f"/v1/subscriptions/{subscription['id']}", headers=admin)).json()
    assert "secret" not in read
    assert secret not in str(read)

    run_a = await start_mosaic_run(mosaic, tenant, "agent-a")
    a = await blocked_run_for(client, tenant, run_a)
    await wait_for_state(client, tenant, a["id"], "awaiting_choice")
    run_b = await start_mosaic_run(mosaic, tenant, "agent-b")
    b = await blocked_run_for(client, tenant, run_b)
    await wait_for_state(client, tenant, b["id"], "awaiting_choice")
    cancelled = await client.post(f"/v1/blocked-runs/{b['id']}/cancel", headers=tenant.headers)
    assert cancelled.json()["state"] == "cancelled"

    # Mosaic refuses the first resume while the run is still failed: the run fails, with a code.
    fault = {
        "method": "POST",
        "path": f"/agent_run/{run_a}/resume",
        "action": "status",
        "status": 409,
        "count": 1,
    }
    (await mosaic.post("/_sandbox/faults", json=fault)).raise_for_status()
    chosen = await client.post(
        f"/v1/blocked-runs/{a['id']}/choose-plan",
        json={"plan_id": "creator"},
        headers=tenant.headers,
    )
    assert chosen.json()["state"] == "topup_prompt", chosen.text
    declined = await client.post(
        f"/v1/blocked-runs/{a['id']}/topup", json={"enable": False}, headers=tenant.headers
    )
    assert declined.json()["state"] == "failed"
    retried = await client.post(f"/v1/blocked-runs/{a['id']}/retry", headers=tenant.headers)
    assert retried.json()["state"] == "resumed", retried.text

    await received_count(receiver, 8, "every event of the flow")
    payloads = [verify(secret, r) for r in receiver.received]
    assert payloads == [r.event for r in receiver.received]
    assert receiver.events_of(a["id"]) == [
        "run.blocked",
        "run.failed",
        "run.blocked",
        "run.resumed",
    ]
    assert receiver.events_of(b["id"]) == ["run.blocked", "run.cancelled"]
    decisions = [p["data"] for p in payloads if p["type"] == "decision.needed"]
    assert [d["asks"] for d in decisions] == [["choose_plan"], ["topup"]]
    assert {p["id"] for p in decisions[0]["plans"]} >= {"creator"}
    assert decisions[1]["plan"]["id"] == "creator"

    failed = next(p["data"] for p in payloads if p["type"] == "run.failed")
    assert failed["error"]["code"] == "resume_refused"
    assert failed["run_id"] == run_a
    assert failed["blocked_run_id"] == a["id"]
    resumed = next(p for p in payloads if p["type"] == "run.resumed")
    assert resumed["data"]["state"] == "resumed"
    assert resumed["timestamp"].endswith("Z")
    # Every message its own webhook-id; every delivery in the log, delivered, with its answer.
    assert len({r.headers["webhook-id"] for r in receiver.received}) == 8
    log = await all_delivered(client, subscription["id"], admin, 8)
    assert {d["last_status_code"] for d in log} == {200}
    assert log[0]["last_response"] == "answered 200"

    # Redelivery on request: the same message (same webhook-id, same bytes) once more.
    first = log[-1]
    again = await client.post(
        f"/v1/subscriptions/{subscription['id']}/deliveries/{first['id']}/redeliver",
        headers=admin,
    )
    assert again.status_code == 202, again.text
    await received_count(receiver, 9, "the redelivery")
    assert receiver.received[-1].headers["webhook-id"] == first["message_id"]
    assert receiver.received[-1].body == receiver.received[0].body
    verify(secret, receiver.received[-1])


async def test_the_subscriber_survives_its_downtime_and_gets_each_runs_events_in_order(
    stack: Stack, receiver: Receiver
) -> None:
    client, mosaic = stack.client, stack.mosaic
    tenant = await make_tenant(client, mosaic)
    subscription = await subscribe(client, tenant, receiver.url, ["run.blocked", "run.cancelled"])
    await receiver.stop()  # the subscriber is down: connections are refused

    ids = []
    for agent in ("agent-1", "agent-2", "agent-3"):
        run_id = await start_mosaic_run(mosaic, tenant, agent)
        blocked = await blocked_run_for(client, tenant, run_id)
        ids.append(blocked["id"])
    for blocked_id in ids:
        answer = await client.post(f"/v1/blocked-runs/{blocked_id}/cancel", headers=tenant.headers)
        assert answer.json()["state"] == "cancelled"

    admin = tenant.token("subscriptions:admin")
    url = f"/v1/subscriptions/{subscription['id']}/deliveries"

    async def failing() -> bool:
        items = (await client.get(url, headers=admin)).json()["items"]
        return (
            len(items) == 6
            and all(d["status"] == "pending" for d in items)
            and any(d["attempts"] >= 2 and d["last_error"] for d in items)
        )

    await eventually(failing, what="attempts to fail while the subscriber is down")

    await receiver.start()  # back on the same port
    await received_count(receiver, 6, "the backlog after the subscriber came back")
    for blocked_id in ids:
        assert receiver.events_of(blocked_id) == ["run.blocked", "run.cancelled"]
    items = await all_delivered(client, subscription["id"], admin, 6)
    assert max(d["attempts"] for d in items) >= 2
    metrics = (await client.get("/metrics")).text
    assert 'unblock_notification_attempts_total{outcome="failed"}' in metrics
    assert "unblock_notification_oldest_undelivered_seconds" in metrics


async def test_a_subscription_may_not_point_at_a_private_address(
    stack: Stack, receiver: Receiver
) -> None:
    client, mosaic = stack.client, stack.mosaic
    tenant = await make_tenant(client, mosaic)
    admin = tenant.token("subscriptions:admin")
    for url in (
        "http://10.1.2.3/hooks",
        "http://169.254.169.254/latest/meta-data",
        "http://192.168.0.10:8080/x",
        "http://127.0.0.2/not-on-the-allowlist",
        "http://[::1]/loopback",
        "http://[::ffff:10.0.0.1]/mapped",
        "http://100.100.100.200/metadata",
        "ftp://example.com/x",
        "http://user:pass@127.0.0.1/creds",
    ):
        answer = await client.post(
            "/v1/subscriptions",
            json={"url": url, "event_types": ["run.blocked"]},
            headers=admin,
        )
        assert answer.status_code == 422, (url, answer.text)
        assert answer.json()["code"] == "destination_not_allowed", url

    # The check is made again at delivery time (DNS rebinding): a subscription whose address is
    # no longer allowed gets nothing sent, and says why.
    subscription = await subscribe(client, tenant, receiver.url, ["run.blocked"])
    async with stack.service.runtime.db.transaction() as session:
        await session.execute(
            text("UPDATE subscriptions SET url = :u WHERE id = :id"),
            {"u": receiver.url.replace("127.0.0.1", "127.0.0.2"), "id": subscription["id"]},
        )
    run_id = await start_mosaic_run(mosaic, tenant)
    await blocked_run_for(client, tenant, run_id)

    async def refused() -> str | None:
        items = (
            await client.get(f"/v1/subscriptions/{subscription['id']}/deliveries", headers=admin)
        ).json()["items"]
        return items[0]["last_error"] if items and items[0]["attempts"] else None

    error = await eventually(refused, what="a refused attempt")
    assert "not go to" in error
    assert receiver.received == []


async def test_production_refuses_plain_http_and_the_address_rules_hold() -> None:
    with pytest.raises(destination.DestinationRefused):
        destination.check_url("http://hooks.example.com/x", https_only=True)
    assert destination.check_url("https://hooks.example.com/x", https_only=True).host
    allow = destination.allowed_networks("10.8.0.0/16")
    assert destination.address_allowed(ipaddress.ip_address("10.8.1.2"), allow)
    assert not destination.address_allowed(ipaddress.ip_address("10.9.1.2"), allow)
    assert not destination.address_allowed(ipaddress.ip_address("fd00:ec2::254"), [])
    assert destination.address_allowed(ipaddress.ip_address("93.184.216.34"), [])


async def test_persistent_failure_disables_the_subscription_visibly_until_re_enabled(
    receiver: Receiver,
) -> None:
    async with isolated_stack("notify_giveup", **FAST_RETRIES, notify_give_up_after=1) as stack:
        client, mosaic = stack.client, stack.mosaic
        tenant = await make_tenant(client, mosaic)
        subscription = await subscribe(client, tenant, receiver.url, ["run.blocked"])
        admin = tenant.token("subscriptions:admin")
        receiver.status = 500
        run_id = await start_mosaic_run(mosaic, tenant)
        await blocked_run_for(client, tenant, run_id)

        async def disabled() -> dict[str, Any] | None:
            read = await client.get(f"/v1/subscriptions/{subscription['id']}", headers=admin)
            body: dict[str, Any] = read.json()
            return body if body["status"] == "disabled" else None

        body = await eventually(disabled, what="the subscription to be disabled")
        assert "kept failing" in body["disabled_reason"]
        log = (
            await client.get(f"/v1/subscriptions/{subscription['id']}/deliveries", headers=admin)
        ).json()["items"]
        assert log[0]["status"] == "failed"
        assert log[0]["last_status_code"] == 500
        assert log[0]["last_response"] == "answered 500"

        receiver.status = 200
        enabled = await client.post(f"/v1/subscriptions/{subscription['id']}/enable", headers=admin)
        assert enabled.json()["status"] == "active"
        assert enabled.json()["disabled_reason"] is None
        again = await client.post(
            f"/v1/subscriptions/{subscription['id']}/deliveries/{log[0]['id']}/redeliver",
            headers=admin,
        )
        assert again.status_code == 202
        await received_count(receiver, 1, "the redelivered event")
        assert receiver.received[0].headers["webhook-id"] == log[0]["message_id"]


async def test_expiry_and_the_set_based_release_announce_their_runs(
    stack: Stack, receiver: Receiver
) -> None:
    client, mosaic = stack.client, stack.mosaic
    tenant = await make_tenant(client, mosaic)
    subscription = await subscribe(client, tenant, receiver.url, ["run.expired", "run.failed"])
    ids = []
    for agent in ("agent-1", "agent-2", "agent-3"):
        blocked = await blocked_run_for(
            client, tenant, await start_mosaic_run(mosaic, tenant, agent)
        )
        await wait_for_state(client, tenant, blocked["id"], "awaiting_choice")
        ids.append(blocked["id"])
    rt = stack.service.runtime
    async with rt.db.transaction() as session:
        run = await repository.lock(session, uuid.UUID(ids[0]))
        await transition(session, run, Event.EXPIRE, actor="system", reason="test: no answer")
    async with rt.db.transaction() as session:
        moved = await release(
            session,
            uuid.UUID(tenant.account_id),
            Event.GIVE_UP,
            actor="system",
            reason="test: Mosaic unreachable",
            limit=100,
            give_up_after_seconds=0,
            error_code="mosaic_unavailable",
            error_message="Mosaic stayed unreachable.",
        )
    assert moved == 2
    await received_count(receiver, 3, "the expiry and the released failures")
    payloads = [verify(subscription["secret"], r) for r in receiver.received]
    assert receiver.events_of(ids[0]) == ["run.expired"]
    for blocked_id in ids[1:]:
        assert receiver.events_of(blocked_id) == ["run.failed"]
    failures = [p["data"] for p in payloads if p["type"] == "run.failed"]
    assert {f["error"]["code"] for f in failures} == {"mosaic_unavailable"}
    assert {f["from_state"] for f in failures} == {"awaiting_choice"}


async def test_subscriptions_are_per_account_and_need_an_admin_scope(
    stack: Stack, receiver: Receiver
) -> None:
    client, mosaic = stack.client, stack.mosaic
    owner = await make_tenant(client, mosaic)
    other = await make_tenant(client, mosaic)
    subscription = await subscribe(client, owner, receiver.url)
    url = f"/v1/subscriptions/{subscription['id']}"
    assert (await client.get(url, headers=other.token("subscriptions:admin"))).status_code == 404
    assert (await client.get(url, headers=owner.headers)).status_code == 403
    assert (await client.get(url, headers=ADMIN)).status_code == 200
    made_by_admin = await client.post(
        "/v1/subscriptions",
        json={"url": receiver.url, "event_types": ["run.resumed"], "account_id": other.account_id},
        headers=ADMIN,
    )
    assert made_by_admin.status_code == 201
    assert made_by_admin.json()["account_id"] == other.account_id
    listed = (
        await client.get("/v1/subscriptions", headers=owner.token("subscriptions:admin"))
    ).json()
    assert [s["id"] for s in listed["items"]] == [subscription["id"]]


async def test_nothing_is_recorded_for_events_nobody_subscribed_to(
    stack: Stack, receiver: Receiver
) -> None:
    client, mosaic = stack.client, stack.mosaic
    quiet = await make_tenant(client, mosaic)
    picky = await make_tenant(client, mosaic)
    await subscribe(client, picky, receiver.url, ["run.resumed"])
    for tenant in (quiet, picky):
        blocked = await blocked_run_for(client, tenant, await start_mosaic_run(mosaic, tenant))
        await wait_for_state(client, tenant, blocked["id"], "awaiting_choice")
        cancelled = await client.post(
            f"/v1/blocked-runs/{blocked['id']}/cancel", headers=tenant.headers
        )
        assert cancelled.json()["state"] == "cancelled"
    async with stack.service.runtime.db.sessions() as session:
        recorded = await session.scalar(
            text("SELECT count(*) FROM notification_deliveries WHERE account_id IN (:a, :b)"),
            {"a": quiet.account_id, "b": picky.account_id},
        )
    # Blocked, a decision needed, cancelled: three events each, none subscribed to.
    assert recorded == 0
    assert receiver.received == []
