"""Delivering the outbox: signed per Standard Webhooks, in order per run, retried with backoff.

One `deliver_notifications` job per subscription (a unique index) drains its deliveries: each
round takes the oldest pending delivery of every ordering key (a run, or the organization) that
is due, posts them side by side, and records the answers. A failed head holds the deliveries
behind it, so a receiver sees each run's events in order; after the give-up horizon the
delivery fails and the subscription is disabled until someone enables it again.

Transitions only insert deliveries; the relay (run by every worker between claims) makes the
drain job exist and be due, in a transaction of its own, so a transition never waits on it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import httpx
from sqlalchemy import select, text, update
from standardwebhooks.webhooks import Webhook

from app import metrics
from app.runtime import Runtime
from app.settings import Environment, Settings
from app.subscriptions import destination
from app.subscriptions.models import Delivery, Subscription
from app.work_queue import ClaimedJob, backoff, finish

log = logging.getLogger(__name__)

ROUND_SIZE = 100  # heads posted side by side per round (each its own run)
PARALLEL = 16  # connections to one subscriber at a time
RESPONSE_EXCERPT = 1024  # bytes of a subscriber's answer kept in the delivery log
RELAY_EVERY = 0.05  # seconds; between claims a worker relays at most this often
GAUGE_EVERY = 5.0


def body_of(delivery: Delivery) -> str:
    """The exact bytes signed and sent: the stored payload, compact and key-sorted."""
    return json.dumps(delivery.payload, separators=(",", ":"), sort_keys=True)


def signed_headers(secret: str, delivery: Delivery, body: str, now: datetime) -> dict[str, str]:
    """The Standard Webhooks headers for one attempt (the id stays, the timestamp is fresh)."""
    signature = Webhook(secret).sign(delivery.message_id, now, body)
    return {
        "content-type": "application/json",
        "webhook-id": delivery.message_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": signature,
    }


@dataclass
class Answer:
    ok: bool
    status_code: int | None
    error: str | None
    excerpt: str | None


async def attempt(
    rt: Runtime, subscription: Subscription, secret: str, delivery: Delivery
) -> Answer:
    """POST one delivery to a checked, pinned address; never raises."""
    settings = rt.settings
    started = time.monotonic()
    try:
        parsed = destination.check_url(subscription.url, https_only=_https_only(settings))
        address = await destination.resolve(
            parsed, destination.allowed_networks(settings.notify_allowed_networks)
        )
        target = destination.pin(parsed, address)
        body = body_of(delivery)
        headers = signed_headers(secret, delivery, body, datetime.now(UTC))
        headers["host"] = target.host_header
        extensions = {"sni_hostname": target.sni_hostname} if target.sni_hostname else {}
        request = rt.notify_http.build_request(
            "POST", target.url, content=body.encode(), headers=headers, extensions=extensions
        )
        response = await rt.notify_http.send(request, stream=True)
        try:
            excerpt = b""
            async for chunk in response.aiter_bytes():
                excerpt += chunk
                if len(excerpt) >= RESPONSE_EXCERPT:  # bounded: a subscriber cannot flood us
                    break
        finally:
            await response.aclose()
        text_excerpt = excerpt[:RESPONSE_EXCERPT].decode("utf-8", errors="replace")
        if 200 <= response.status_code < 300:
            return Answer(True, response.status_code, None, text_excerpt)
        why = "a redirect (not followed)" if response.is_redirect else "not a 2xx"
        return Answer(
            False, response.status_code, f"HTTP {response.status_code}: {why}", text_excerpt
        )
    except destination.DestinationRefused as exc:
        return Answer(False, None, exc.detail, None)
    except httpx.TimeoutException:
        return Answer(False, None, f"timed out after {settings.notify_timeout}", None)
    except httpx.HTTPError as exc:
        return Answer(False, None, f"{type(exc).__name__}: {exc}"[:500], None)
    finally:
        metrics.NOTIFY_ATTEMPT_SECONDS.observe(time.monotonic() - started)


def _https_only(settings: Settings) -> bool:
    return settings.env is Environment.PRODUCTION


_HEADS = """
SELECT * FROM (
    SELECT DISTINCT ON (ordering_key) *
    FROM notification_deliveries
    WHERE subscription_id = :subscription_id AND status = 'pending'
    ORDER BY ordering_key, id
) AS heads
WHERE next_attempt_at <= now()
ORDER BY id
LIMIT :limit
"""

# A delivery waits for the ones before it with the same key: never due before its head.
_HOLD_BEHIND_HEADS = """
UPDATE notification_deliveries AS d SET next_attempt_at = h.next_attempt_at
FROM (
    SELECT DISTINCT ON (ordering_key) ordering_key, next_attempt_at
    FROM notification_deliveries
    WHERE subscription_id = :subscription_id AND status = 'pending'
    ORDER BY ordering_key, id
) AS h
WHERE d.subscription_id = :subscription_id AND d.status = 'pending'
  AND d.ordering_key = h.ordering_key AND d.next_attempt_at < h.next_attempt_at
"""


async def deliver(rt: Runtime, job: ClaimedJob) -> None:
    """The drain step of one subscription: rounds of due heads while the lease allows."""
    settings = rt.settings
    subscription_id = uuid.UUID(job.payload["subscription_id"])
    async with rt.db.sessions() as session:
        subscription = await session.get(Subscription, subscription_id)
    if subscription is None or subscription.status != "active":
        async with rt.db.transaction() as session:
            await finish(session, job)
        return
    secret = rt.keyring.decrypt(subscription.secret_encrypted)
    loop = asyncio.get_running_loop()
    # A round may take a whole attempt timeout; start one only while it ends well inside the
    # step's box (75% of the lease), so answers are recorded before another worker may claim.
    last_start = loop.time() + settings.job_lease.total_seconds() * 0.6
    last_start -= settings.notify_timeout.total_seconds()
    gate = asyncio.Semaphore(PARALLEL)

    async def one(delivery: Delivery) -> Answer:
        async with gate:
            return await attempt(rt, subscription, secret, delivery)

    first = True
    while first or loop.time() < last_start:
        first = False
        async with rt.db.sessions() as session:
            deliveries = list(
                await session.scalars(
                    select(Delivery).from_statement(text(_HEADS)),
                    {"subscription_id": subscription_id, "limit": ROUND_SIZE},
                )
            )
        if not deliveries:
            break
        answers = await asyncio.gather(*(one(d) for d in deliveries))
        if await _record(rt, subscription, deliveries, answers):
            break  # disabled: the rest waits for someone to enable it again
    async with rt.db.transaction() as session:
        await session.execute(text(_HOLD_BEHIND_HEADS), {"subscription_id": subscription_id})
        next_due = await session.scalar(
            text(
                "SELECT min(next_attempt_at) FROM notification_deliveries "
                "WHERE subscription_id = :s AND status = 'pending'"
            ),
            {"s": subscription_id},
        )
        status = await session.scalar(
            text("SELECT status FROM subscriptions WHERE id = :s"), {"s": subscription_id}
        )
        if next_due is None or status != "active":
            await finish(session, job)
            return
        # Still work: the same job comes back when the earliest delivery is due (the relay makes
        # it due sooner when a new delivery arrives for another run).
        await session.execute(
            text(
                "UPDATE jobs SET run_after = :due, locked_until = NULL, locked_by = NULL "
                "WHERE id = :id AND locked_by = :worker AND status = 'pending'"
            ),
            {"due": next_due, "id": job.id, "worker": job.worker_id},
        )


async def _record(
    rt: Runtime, subscription: Subscription, deliveries: list[Delivery], answers: list[Answer]
) -> bool:
    """Store each answer; a delivery past its horizon fails and disables the subscription."""
    settings = rt.settings
    now = datetime.now(UTC)
    disabled = False
    async with rt.db.transaction() as session:
        for delivery, answer in zip(deliveries, answers, strict=True):
            attempts = delivery.attempts + 1
            values: dict[str, object] = {
                "attempts": attempts,
                "last_attempt_at": now,
                "last_status_code": answer.status_code,
                "last_error": answer.error,
                "last_response": answer.excerpt,
            }
            horizon = delivery.give_up_at or delivery.created_at + settings.notify_give_up_after
            if answer.ok:
                values |= {"status": "delivered", "delivered_at": now}
                metrics.NOTIFY_DELIVERIES.labels("delivered").inc()
            elif now >= horizon:
                values |= {"status": "failed"}
                metrics.NOTIFY_DELIVERIES.labels("gave_up").inc()
                disabled = True
                reason = (
                    f"delivery {delivery.id} ({delivery.event_type}) kept failing for "
                    f"{settings.notify_give_up_after}: {answer.error}"
                )
                await session.execute(
                    update(Subscription)
                    .where(Subscription.id == subscription.id, Subscription.status == "active")
                    .values(
                        status="disabled",
                        disabled_reason=reason[:1000],
                        disabled_at=now,
                        updated_at=now,
                    )
                )
                log.error("subscription %s disabled: %s", subscription.id, reason)
            else:
                delay = backoff(
                    attempts,
                    base=settings.notify_retry_base,
                    cap=settings.notify_retry_max,
                    retry_after=None,
                )
                values |= {"next_attempt_at": min(now + delay, horizon)}
                metrics.NOTIFY_DELIVERIES.labels("failed").inc()
            await session.execute(
                update(Delivery)
                .where(Delivery.id == delivery.id, Delivery.status == "pending")
                .values(**values)
            )
    return disabled


_RELAY = """
WITH made AS (
    INSERT INTO jobs (kind, account_id, payload, give_up_at)
    SELECT 'deliver_notifications', s.account_id,
           jsonb_build_object('subscription_id', CAST(s.id AS text)),
           now() + interval '100 years'
    FROM subscriptions AS s
    WHERE s.status = 'active' AND EXISTS (
        SELECT 1 FROM notification_deliveries AS d
        WHERE d.subscription_id = s.id AND d.status = 'pending' AND d.next_attempt_at <= now())
    ON CONFLICT DO NOTHING
    RETURNING 1
), woken AS (
    UPDATE jobs AS j SET run_after = now()
    WHERE j.kind = 'deliver_notifications' AND j.status = 'pending' AND j.run_after > now()
      AND (j.locked_until IS NULL OR j.locked_until < now())
      AND EXISTS (
        SELECT 1 FROM notification_deliveries AS d
        WHERE d.subscription_id = CAST(j.payload->>'subscription_id' AS uuid)
          AND d.status = 'pending' AND d.next_attempt_at <= now())
    RETURNING 1
)
SELECT (SELECT count(*) FROM made) + (SELECT count(*) FROM woken)
"""


class Relay:
    """Makes each subscription with due deliveries have a due drain job (one per worker)."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self._next = 0.0
        self._next_gauge = 0.0

    async def run(self) -> int:
        """Relay now unless it ran a moment ago; how many drain jobs were made or woken."""
        now = time.monotonic()
        if now < self._next:
            return 0
        self._next = now + RELAY_EVERY
        # On the plain pool, each statement its own transaction: this runs up to 1/RELAY_EVERY
        # times a second in every worker, and through an ORM session each run also paid a
        # pre-ping round trip and a unit of work.
        pool = await self.rt.db.driver_pool()
        async with pool.acquire() as conn:
            relayed = int(await conn.fetchval(_RELAY) or 0)
            if now >= self._next_gauge:
                self._next_gauge = now + GAUGE_EVERY
                oldest = await conn.fetchval(
                    "SELECT extract(epoch FROM now() - min(created_at)) "
                    "FROM notification_deliveries WHERE status = 'pending'"
                )
                metrics.NOTIFY_OLDEST_UNDELIVERED.set(float(oldest or 0))
        return relayed


async def prune(rt: Runtime, retention: timedelta) -> None:
    """Drop finished deliveries older than the retention (the log keeps the recent ones)."""
    async with rt.db.transaction() as session:
        await session.execute(
            text(
                "DELETE FROM notification_deliveries WHERE status <> 'pending' "
                "AND created_at < now() - make_interval(secs => :keep)"
            ),
            {"keep": retention.total_seconds()},
        )
