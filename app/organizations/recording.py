"""The decision's moves on a plain asyncpg connection, for the worker's `check_plan` step.

The same writes as `repository.lock`, `finish`, `state_machine.transition` and
`service.decide` (guarded UPDATE, history row, `decision.needed` in the outbox, the waiting runs
released set-based, the NOTIFYs), in a few statements on `Database.raw()` instead of one ORM
round trip each: a step pays a handful of round trips, not some twenty-five. The states and
events come from the Python tables (`TRANSITIONS`, `ACTIONS`), never restated here. Lock order as
everywhere: the decision's row first (FOR NO KEY UPDATE), then its job, then its runs in id order.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from functools import cache
from typing import Any

import asyncpg

from app.blocked_runs.state_machine import Event, IllegalTransition, release_on
from app.database import Compiled, compile_named
from app.notifications import JOBS_CHANNEL, RUN_EVENTS_CHANNEL
from app.organizations.models import Decision
from app.organizations.state_machine import DecisionState, actions_for, target_of
from app.subscriptions import outbox
from app.work_queue import (
    FINISH_UPDATE,
    ClaimedJob,
    JobKind,
    finish_binds,
    finished,
    organization_key,
)


class _Now:
    """A change's value meaning the statement's `now()` (as `func.now()` does in the ORM)."""

    def __repr__(self) -> str:
        return "NOW"


NOW: Any = _Now()

# What a move may change besides the columns it always sets.
_CHANGEABLE = frozenset(c.name for c in Decision.__table__.columns) - {
    "account_id",
    "state",
    "version",
    "round",
    "last_event",
    "created_at",
    "updated_at",
    "state_changed_at",
}

# The account's stored (encrypted) Mosaic key comes along in the same round trip, for a step
# whose organization's key is not cached (`Runtime.mosaic_key(..., encrypted=)`).
_LOCK = (
    "SELECT d.state, d.version, a.mosaic_api_key_encrypted AS key"
    " FROM organization_decisions AS d JOIN accounts AS a ON a.id = d.account_id"
    " WHERE d.account_id = $1 FOR NO KEY UPDATE OF d"
)


@dataclass(frozen=True)
class Locked:
    account_id: uuid.UUID
    state: str
    version: int
    encrypted_key: str | None = None


async def lock(conn: asyncpg.Connection, account_id: uuid.UUID) -> Locked:
    """`repository.lock` on a plain connection: the decision's row (made on first use)."""
    row = await conn.fetchrow(_LOCK, account_id)
    if row is None:
        await conn.execute(
            "INSERT INTO organization_decisions (account_id) VALUES ($1) ON CONFLICT DO NOTHING",
            account_id,
        )
        row = await conn.fetchrow(_LOCK, account_id)
        if row is None:
            raise LookupError(f"account {account_id} is gone")
    return Locked(account_id, row["state"], row["version"], row["key"])


@cache
def _move_statement(keys: tuple[str, ...], now_keys: tuple[str, ...], with_job: bool) -> Compiled:
    sets = [f"{key} = :c_{key}" for key in keys] + [f"{key} = now()" for key in now_keys]
    # The move only if the job closed: a lost lease (no row) or a job asked for again
    # ('pending') records nothing but that.
    done = f"done AS ({FINISH_UPDATE}), " if with_job else ""
    gate = "AND EXISTS (SELECT 1 FROM done WHERE status = 'done')" if with_job else ""
    job_status = "(SELECT status FROM done)" if with_job else "CAST(NULL AS text)"
    return compile_named(f"""
WITH {done}moved AS (
    UPDATE organization_decisions AS d
    SET state = CAST(:to_state AS text), version = d.version + 1,
        round = d.round + CAST(:new_round AS integer), last_event = CAST(:event AS text),
        updated_at = now(), state_changed_at = now(){"".join(", " + s for s in sets)}
    WHERE d.account_id = CAST(:account_id AS uuid) AND d.state = CAST(:from_state AS text)
      AND d.version = CAST(:version AS integer) {gate}
    RETURNING d.*
), history AS (
    INSERT INTO organization_decision_history
        (account_id, round, from_state, to_state, event, actor, reason)
    SELECT account_id, round, CAST(:from_state AS text), state, CAST(:event AS text),
           CAST(:actor AS text), CAST(:reason AS text)
    FROM moved
), deliveries AS ({outbox.decision_deliveries_sql("moved")} RETURNING 1)
SELECT {job_status} AS job, (SELECT count(*) FROM moved) AS moved,
       (SELECT count(*) FROM deliveries) AS delivered,
       pg_notify(CAST(:channel AS text), CAST(:org_key AS text))
""")


async def move(
    conn: asyncpg.Connection,
    decision: Locked,
    event: Event,
    *,
    actor: str,
    reason: str,
    job: ClaimedJob | None = None,
    **changes: Any,
) -> bool:
    """`transition` on a plain connection, with `finish` of `job` (if given) in the same
    statement: False, and nothing moved, if the job was asked for again; LeaseLost (roll back)
    if it is no longer ours. The caller holds the decision's lock (`lock`)."""
    target = target_of(decision.state, event)
    unknown = set(changes) - _CHANGEABLE
    if unknown:
        raise ValueError(f"not a decision's data: {sorted(unknown)}")
    keys = tuple(sorted(k for k, v in changes.items() if v is not NOW))
    now_keys = tuple(sorted(k for k, v in changes.items() if v is NOW))
    statement = _move_statement(keys, now_keys, job is not None)
    asks = actions_for(target.value, pending=False)
    binds: dict[str, Any] = {
        "account_id": decision.account_id,
        "from_state": decision.state,
        "version": decision.version,
        "to_state": target.value,
        "new_round": 1 if event is Event.BLOCKED else 0,
        "event": event.value,
        "actor": actor,
        "reason": reason,
        # The decision now waits on a person: `decision.needed`, naming what is asked.
        "notify_type": outbox.EventType.DECISION_NEEDED.value if asks else None,
        "asks": asks,
        "channel": RUN_EVENTS_CHANNEL,
        "org_key": organization_key(decision.account_id),
        **{f"c_{k}": changes[k] for k in keys},
        **(finish_binds(job) if job is not None else {}),
    }
    row = await conn.fetchrow(statement.sql, *statement.args(binds))
    assert row is not None
    if job is not None and not finished(job, row["job"]):
        await conn.execute("SELECT pg_notify($1, '')", JOBS_CHANNEL)
        return False
    if not row["moved"]:
        current = await conn.fetchval(
            "SELECT state FROM organization_decisions WHERE account_id = $1", decision.account_id
        )
        raise IllegalTransition(
            f"The organization's decision changed concurrently; it is now {current}.",
            state=current,
        )
    if row["delivered"]:
        await conn.execute("SELECT pg_notify($1, '')", JOBS_CHANNEL)
    return True


async def decide(
    conn: asyncpg.Connection,
    decision: Locked,
    event: Event,
    *,
    actor: str,
    reason: str,
    job: ClaimedJob,
    release_limit: int,
    give_up_after_seconds: float,
    **changes: Any,
) -> bool:
    """`service.decide` on a plain connection for a step: close `job`, move the decision, then
    release its waiting runs (up to `release_limit`; a release job moves the rest). False if
    the job was asked for again (nothing moved)."""
    if event is Event.GIVE_UP:
        raise ValueError("a give-up releases with the decision's error: use service.decide")
    if not await move(conn, decision, event, actor=actor, reason=reason, job=job, **changes):
        return False
    moved = await release_on(
        conn,
        decision.account_id,
        event,
        actor=actor,
        reason=f"the organization's decision: {event.value.replace('_', ' ')}",
        limit=release_limit,
        give_up_after_seconds=give_up_after_seconds,
        organization_announced=True,  # by `move`, in this transaction
    )
    if moved >= release_limit:
        await conn.execute(
            "WITH job AS (INSERT INTO jobs (kind, account_id, give_up_at)"
            " VALUES ($1, $2, now() + make_interval(secs => $3::float8))"
            " ON CONFLICT DO NOTHING RETURNING id)"
            " SELECT pg_notify($4, '') FROM job",
            JobKind.RELEASE_RUNS.value,
            decision.account_id,
            give_up_after_seconds,
            JOBS_CHANNEL,
        )
    return True


__all__ = ["NOW", "DecisionState", "Locked", "decide", "lock", "move"]
