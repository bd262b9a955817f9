"""Mosaic webhooks: verify, store once, and act on what the event says.

Nothing here calls Mosaic inside a request: a failure without the credits flag is recorded as
a `verify_run` job, and the worker asks Mosaic whether the run is really credit-blocked.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from enum import StrEnum
from typing import Any

from sqlalchemy import update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from app import metrics
from app.accounts.secrets import webhook_secret_matches
from app.blocked_runs import repository
from app.blocked_runs.service import open_blocked_run
from app.blocked_runs.state_machine import ACTIVE_STATES, Event, State, transition
from app.errors import DomainError, NotFound, Unauthorized
from app.mosaic import needs_credits
from app.runtime import Runtime
from app.webhooks import ingest
from app.webhooks.event_shape import finite_float, shape_problem
from app.webhooks.models import WebhookEvent
from app.work_queue import ClaimedJob, NotYet, begin_recording, enqueue_verification, finish

MOSAIC = "mosaic"


class Outcome(StrEnum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    IGNORED = "ignored"


class MalformedWebhook(DomainError):
    status = 422
    code = "malformed_webhook"


# unblock_webhooks_total's series, looked up once (`labels` takes a lock on every call).
_COUNTED = {
    str(outcome): metrics.WEBHOOKS.labels(outcome)
    for outcome in (*(o.value for o in Outcome), "unauthorized")
}

# The only flags `_act` can act on; every other event is answered `ignored` without storing it.
ACTED_ON_FLAGS = frozenset({"RUN_FINISHED", "RUN_STARTED"})

# Longest values the inbox and blocked runs store; longer ones are refused, not cut.
FIELD_LIMITS = {"flag": 64, "run_id": 200, "agent_id": 200, "status": 64}


def _no_constants(name: str) -> None:
    # NaN and Infinity are not JSON, and PostgreSQL's jsonb refuses them.
    raise ValueError(f"{name} is not valid JSON")


def parse_event(raw: bytes) -> dict[str, Any]:
    """The event as a dict, or a 4xx naming what is wrong (never a 5xx from the database)."""
    if b"\x00" in raw or b"\\u0000" in raw:
        raise MalformedWebhook("NUL characters cannot be stored.", status=400, code="invalid_json")
    try:
        payload = json.loads(raw, parse_constant=_no_constants, parse_float=finite_float)
    except (ValueError, RecursionError) as exc:
        raise MalformedWebhook("The body is not JSON.", status=400, code="invalid_json") from exc
    if not isinstance(payload, dict):
        raise MalformedWebhook("The body must be a JSON object.")
    # Lone surrogates parse but cannot be stored. They come only from a `\u` escape or from
    # their UTF-8 form (0xED 0xA0-0xBF), which json.loads lets through; only then is it checked.
    if b"\\u" in raw or b"\xed" in raw:
        try:
            json.dumps(payload, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise MalformedWebhook(
                "The body holds invalid Unicode.", status=400, code="invalid_json"
            ) from exc
    for field in ("flag", "run_id"):
        if not isinstance(payload.get(field), str) or not payload[field].strip():
            raise MalformedWebhook(f"The event needs a string `{field}`.")
    for field, limit in FIELD_LIMITS.items():
        value = payload.get(field)
        if value is not None and not isinstance(value, str):
            raise MalformedWebhook(f"`{field}` must be a string.")
        if value is not None and len(value) > limit:
            raise MalformedWebhook(f"`{field}` is longer than {limit} characters.")
    if problem := shape_problem(payload):
        raise MalformedWebhook(problem)
    return payload


def canonical_json(payload: dict[str, Any]) -> str:
    """The event as JSON with sorted keys: what its deduplication key is made from."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def dedup_key(payload: dict[str, Any], generation: int, *, canonical: str | None = None) -> str:
    """Identical deliveries share a key. The generation (times the run entered `resuming`) keeps
    a run that blocks again after a resume, with a byte-identical RUN_FINISHED, from looking
    like a copy of the first one."""
    text = canonical if canonical is not None else canonical_json(payload)
    return hashlib.sha256(f"{generation}:{text}".encode()).hexdigest()


async def receive(rt: Runtime, account_id: uuid.UUID, signature: str | None, raw: bytes) -> Outcome:
    """Verify, store durably and deduplicated, act; the answer is sent only after commit."""
    secret_hash = await rt.webhook_secret_hash(account_id)
    if secret_hash is None:
        raise NotFound("No such account.", code="account_not_found")
    if not webhook_secret_matches(signature, secret_hash):
        _COUNTED["unauthorized"].inc()
        raise Unauthorized("X-Mosaic-Signature does not match.", code="bad_signature")
    payload = parse_event(raw)
    flag = payload["flag"].upper()
    if flag not in ACTED_ON_FLAGS:
        # Never acted on, whatever the run's state (RUN_PROGRESS, TEST, flags Mosaic adds):
        # counted, not stored, so the most common event costs no database write.
        _COUNTED[Outcome.IGNORED].inc()
        return Outcome.IGNORED
    if _runs_again(payload):
        # News that a run runs (again) matters only to an open episode; without one it is
        # ignored, so it is counted, not stored (a later copy, once an episode is open, is a
        # hint that Mosaic is asked about, as any new one would be).
        if not await rt.news_reads.awaiting_news(account_id, payload["run_id"]):
            _COUNTED[Outcome.IGNORED].inc()
            return Outcome.IGNORED
    elif flag == "RUN_FINISHED" and needs_credits(payload):
        # The common block, a run never reported before, in one statement (`ingest`); the
        # generation is 0 there, as no episode of the run exists.
        canonical = canonical_json(payload)
        opened = await ingest.open_first_block(
            rt.db,
            account_id=account_id,
            run_id=payload["run_id"],
            agent_id=payload.get("agent_id"),
            flag=payload["flag"],
            dedup_key=dedup_key(payload, 0, canonical=canonical),
            payload=canonical,
            raw_body=raw.decode("utf-8", errors="replace"),
            actor=MOSAIC,
            reason=f"{flag} with the flag",
            give_up_seconds=rt.settings.give_up_after.total_seconds(),
        )
        if opened is not None:
            outcome = Outcome.ACCEPTED if opened else Outcome.DUPLICATE
            _COUNTED[outcome].inc()
            return outcome
    async with rt.db.transaction() as session:
        run_id = payload["run_id"]
        generation = await repository.resume_generation(session, account_id, run_id)
        event_id = await session.scalar(
            pg_insert(WebhookEvent)
            .values(
                account_id=account_id,
                dedup_key=dedup_key(payload, generation),
                flag=payload["flag"],
                run_id=run_id,
                payload=payload,
                raw_body=raw.decode("utf-8", errors="replace"),
                outcome="received",
            )
            .on_conflict_do_nothing()
            .returning(WebhookEvent.id)
        )
        if event_id is None:
            outcome = Outcome.DUPLICATE
        else:
            outcome = await _act(rt, session, account_id, payload)
            await session.execute(
                update(WebhookEvent).where(WebhookEvent.id == event_id).values(outcome=outcome)
            )
    _COUNTED[outcome].inc()
    return outcome


def _runs_again(payload: dict[str, Any]) -> bool:
    """RUN_STARTED, or a completed RUN_FINISHED: what `_act` weighs only against an open episode."""
    flag = payload["flag"].upper()
    status = (payload.get("status") or "").lower()
    if flag == "RUN_STARTED":
        return True
    return flag == "RUN_FINISHED" and status == "completed" and not needs_credits(payload)


async def replay(rt: Runtime, event_id: int, actor: str) -> Outcome:
    """Act on a stored Mosaic webhook again, as if it had just arrived (an operator's replay).

    The same code as a delivery; only the actor differs, so what it opens is the operator's.
    """
    async with rt.db.transaction() as session:
        event = await session.get(WebhookEvent, event_id, with_for_update=True)
        if event is None:
            raise NotFound("No such webhook event.", code="webhook_event_not_found")
        outcome = await _act(rt, session, event.account_id, event.payload, actor=actor)
        await session.execute(
            update(WebhookEvent).where(WebhookEvent.id == event_id).values(outcome=outcome)
        )
    return outcome


async def _act(
    rt: Runtime,
    session: AsyncSession,
    account_id: uuid.UUID,
    payload: dict[str, Any],
    *,
    actor: str = MOSAIC,
) -> Outcome:
    flag = payload["flag"].upper()
    status = (payload.get("status") or "").lower()
    run_id: str = payload["run_id"]
    agent_id = payload.get("agent_id")

    if flag == "RUN_FINISHED" and needs_credits(payload):
        latest = await repository.latest_episode(session, account_id, run_id)
        if latest is None:  # the first we hear of this run: the flag is enough
            return await _open(
                rt, session, account_id, run_id, agent_id, f"{flag} with the flag", actor=actor
            )
        if latest.state in ACTIVE_STATES and latest.state != State.RESUMING:
            return Outcome.DUPLICATE
        # The run was blocked before (or we are resuming it): this is either a late copy of
        # the old failure or the run blocking again after a resume. Mosaic decides.
        await _verify_later(rt, session, account_id, run_id, agent_id)
        return Outcome.ACCEPTED
    if flag == "RUN_FINISHED" and status == "failed":
        await _verify_later(rt, session, account_id, run_id, agent_id)
        return Outcome.ACCEPTED
    if flag == "RUN_STARTED" or (flag == "RUN_FINISHED" and status == "completed"):
        episode = await repository.open_episode_for(session, account_id, run_id)
        if episode is None or episode.state == State.RESUMING:
            # While we resume it, our own step settles the outcome with Mosaic: the event may be
            # a late copy from before the block, and must not close the episode on its own.
            return Outcome.IGNORED
        # Perhaps resumed elsewhere, perhaps a late or repeated copy from before the block
        # (Mosaic documents no delivery order): a hint only. Mosaic decides.
        await _verify_later(rt, session, account_id, run_id, agent_id)
        return Outcome.ACCEPTED
    return Outcome.IGNORED


async def _verify_later(
    rt: Runtime, session: AsyncSession, account_id: uuid.UUID, run_id: str, agent_id: str | None
) -> None:
    await enqueue_verification(
        session,
        account_id=account_id,
        run_id=run_id,
        agent_id=agent_id,
        give_up_after=rt.settings.give_up_after,
    )


async def _open(
    rt: Runtime,
    session: AsyncSession,
    account_id: uuid.UUID,
    run_id: str,
    agent_id: str | None,
    reason: str,
    *,
    actor: str = MOSAIC,
) -> Outcome:
    opened = await open_blocked_run(
        rt,
        session,
        account_id=account_id,
        run_id=run_id,
        agent_id=agent_id,
        actor=actor,
        reason=reason,
    )
    return Outcome.ACCEPTED if opened is not None else Outcome.DUPLICATE


RUNNING_AGAIN = frozenset({"running", "completed"})


async def verify_run(rt: Runtime, job: ClaimedJob) -> None:
    """Ask Mosaic about a run (run, then nodes) before acting on what an event said of it.

    Without an open episode: open one only if Mosaic confirms the run is blocked for credits.
    With one (a RUN_STARTED or completed RUN_FINISHED arrived): close it only if Mosaic says the
    run runs again. A request that arrives while this one is under way makes it run again
    (`finish` refuses to close it), so no news is lost.
    """
    run_id: str = job.payload["run_id"]
    async with rt.db.sessions() as session:
        episode = await repository.open_episode_for(session, job.account_id, run_id)
    if episode is not None and episode.state == State.RESUMING:
        raise NotYet(f"run {run_id} is being resumed")
    api_key = await rt.mosaic_key(job.account_id)
    agent_run, body = await rt.mosaic.get_run(api_key, run_id)
    blocked = agent_run.needs_credits or needs_credits(body)
    if not blocked and (agent_run.status or "").lower() == "failed":
        nodes = await rt.mosaic.get_run_nodes(api_key, run_id)
        blocked = any(node.needs_credits for node in nodes)
    status = (agent_run.status or "").lower()
    begin_recording(rt.settings.job_lease)
    async with rt.db.transaction() as session:
        if episode is not None:
            run = await repository.lock(session, episode.id)
            if not await finish(session, job):
                return
            if run.state in ACTIVE_STATES and run.state != State.RESUMING:
                if not blocked and status in RUNNING_AGAIN:
                    await transition(
                        session,
                        run,
                        Event.RUN_RESTARTED,
                        actor=MOSAIC,
                        reason=f"Mosaic reports the run {status} again",
                    )
            return
        if not await finish(session, job):
            return
        if blocked:
            agent_id = agent_run.agent_id or job.payload.get("agent_id")
            await _open(
                rt, session, job.account_id, run_id, agent_id, "failed; Mosaic confirms credits"
            )
