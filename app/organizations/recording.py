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
from collections.abc import Collection
from dataclasses import dataclass
from functools import cache
from typing import Any

import asyncpg

from app.blocked_runs.state_machine import Event, release_on
from app.database import Compiled, compile_named
from app.notifications import JOBS_CHANNEL, RUN_EVENTS_CHANNEL
from app.organizations.models import Decision
from app.organizations.state_machine import DecisionState, actions_for, target_of
from app.subscriptions import outbox
from app.work_queue import (
    ClaimedJob,
    JobKind,
    finish_binds,
    finish_update_sql,
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

_LOCK = "SELECT state FROM organization_decisions WHERE account_id = $1 FOR NO KEY UPDATE"


async def lock(conn: asyncpg.Connection, account_id: uuid.UUID) -> str | None:
    """`repository.lock` on a plain connection, in the caller's transaction: the decision's
    state (None: the account is gone)."""
    state: str | None = await conn.fetchval(_LOCK, account_id)
    if state is None:
        await conn.execute(
            "INSERT INTO organization_decisions (account_id) VALUES ($1) ON CONFLICT DO NOTHING",
            account_id,
        )
        state = await conn.fetchval(_LOCK, account_id)
    return state


@dataclass(frozen=True)
class Moved:
    """What a step's statement found and did."""

    state: str | None  # the decision's state it locked (None: no decision row yet)
    moved: bool  # the decision moved (and its job, if any, closed)
    encrypted_key: str | None  # the account's stored Mosaic key, read along


@cache
def _move_statement(keys: tuple[str, ...], now_keys: tuple[str, ...], with_job: bool) -> Compiled:
    # `locked` takes the decision's row lock before anything else in the statement is written
    # (`done` and `moved` both read it first): the one lock order, decision row first. Locking
    # returns the row's latest version, so the move applies to the state it saw, whatever
    # committed just before; no version guard is needed while the lock is held.
    sets = [f"{key} = :c_{key}" for key in keys] + [f"{key} = now()" for key in now_keys]
    done = (
        f"done AS ({finish_update_sql('AND EXISTS (SELECT 1 FROM locked)')}), " if with_job else ""
    )
    # The move only if the job closed: a lost lease (no row) or a job asked for again
    # ('pending') records nothing but that.
    gate = "AND EXISTS (SELECT 1 FROM done WHERE status = 'done')" if with_job else ""
    job_status = "(SELECT status FROM done)" if with_job else "CAST(NULL AS text)"
    return compile_named(f"""
WITH locked AS MATERIALIZED (
    SELECT d.state, a.mosaic_api_key_encrypted AS key
    FROM organization_decisions AS d JOIN accounts AS a ON a.id = d.account_id
    WHERE d.account_id = CAST(:account_id AS uuid)
    FOR NO KEY UPDATE OF d
), {done}moved AS (
    UPDATE organization_decisions AS d
    SET state = CAST(:to_state AS text), version = d.version + 1,
        round = d.round + CAST(:new_round AS integer), last_event = CAST(:event AS text),
        updated_at = now(), state_changed_at = now(){"".join(", " + s for s in sets)}
    FROM locked
    WHERE d.account_id = CAST(:account_id AS uuid)
      AND locked.state = ANY(CAST(:froms AS text[])) {gate}
    RETURNING d.*, locked.state AS from_state
), history AS (
    INSERT INTO organization_decision_history
        (account_id, round, from_state, to_state, event, actor, reason)
    SELECT account_id, round, from_state, state, CAST(:event AS text),
           CAST(:actor AS text), CAST(:reason AS text)
    FROM moved
), deliveries AS ({outbox.decision_deliveries_sql("moved")} RETURNING 1)
SELECT (SELECT state FROM locked) AS state, (SELECT key FROM locked) AS key,
       {job_status} AS job, (SELECT count(*) FROM moved) AS moved,
       (SELECT count(*) FROM deliveries) AS delivered,
       CASE WHEN EXISTS (SELECT 1 FROM moved) OR {job_status} IS NOT NULL
            THEN pg_notify(CAST(:channel AS text), CAST(:org_key AS text)) END AS notified
""")


async def move(
    conn: asyncpg.Connection,
    account_id: uuid.UUID,
    event: Event,
    *,
    froms: Collection[DecisionState],
    actor: str,
    reason: str,
    job: ClaimedJob | None = None,
    **changes: Any,
) -> Moved:
    """In one statement: lock the decision, close `job` (if given: `finish`), and, if the
    decision is in one of `froms` (and the job closed), move it by `event` (`transition`:
    guarded by the table, history row, `decision.needed` in the outbox, NOTIFY).

    LeaseLost (roll back) if the job is no longer ours; nothing moved if it was asked for
    again. Alone (no job), one statement is its own transaction."""
    targets = {target_of(state, event) for state in froms}
    if len(targets) != 1:
        raise ValueError(f"{event.value} from {sorted(froms)} leads to {len(targets)} states")
    (target,) = targets
    unknown = set(changes) - _CHANGEABLE
    if unknown:
        raise ValueError(f"not a decision's data: {sorted(unknown)}")
    keys = tuple(sorted(k for k, v in changes.items() if v is not NOW))
    now_keys = tuple(sorted(k for k, v in changes.items() if v is NOW))
    statement = _move_statement(keys, now_keys, job is not None)
    asks = actions_for(target.value, pending=False)
    binds: dict[str, Any] = {
        "account_id": account_id,
        "froms": sorted(state.value for state in froms),
        "to_state": target.value,
        "new_round": 1 if event is Event.BLOCKED else 0,
        "event": event.value,
        "actor": actor,
        "reason": reason,
        # The decision now waits on a person: `decision.needed`, naming what is asked.
        "notify_type": outbox.EventType.DECISION_NEEDED.value if asks else None,
        "asks": asks,
        "channel": RUN_EVENTS_CHANNEL,
        "org_key": organization_key(account_id),
        **{f"c_{k}": changes[k] for k in keys},
        **(finish_binds(job) if job is not None else {}),
    }
    row = await conn.fetchrow(statement.sql, *statement.args(binds))
    assert row is not None
    closed = job is None or finished(job, row["job"])
    if not closed or row["delivered"]:
        await conn.execute("SELECT pg_notify($1, '')", JOBS_CHANNEL)
    return Moved(row["state"], bool(row["moved"]), row["key"])


async def decide(
    conn: asyncpg.Connection,
    account_id: uuid.UUID,
    event: Event,
    *,
    froms: Collection[DecisionState],
    actor: str,
    reason: str,
    job: ClaimedJob,
    release_limit: int,
    give_up_after_seconds: float,
    **changes: Any,
) -> Moved:
    """`service.decide` on a plain connection for a step, in the caller's transaction: close
    `job` and move the decision (`move`), then release its waiting runs (up to
    `release_limit`; a release job moves the rest)."""
    if event is Event.GIVE_UP:
        raise ValueError("a give-up releases with the decision's error: use service.decide")
    outcome = await move(
        conn, account_id, event, froms=froms, actor=actor, reason=reason, job=job, **changes
    )
    if not outcome.moved:
        return outcome
    released = await release_on(
        conn,
        account_id,
        event,
        actor=actor,
        reason=f"the organization's decision: {event.value.replace('_', ' ')}",
        limit=release_limit,
        give_up_after_seconds=give_up_after_seconds,
        organization_announced=True,  # by `move`, in this transaction
    )
    if released >= release_limit:
        await conn.execute(
            "WITH job AS (INSERT INTO jobs (kind, account_id, give_up_at)"
            " VALUES ($1, $2, now() + make_interval(secs => $3::float8))"
            " ON CONFLICT DO NOTHING RETURNING id)"
            " SELECT pg_notify($4, '') FROM job",
            JobKind.RELEASE_RUNS.value,
            account_id,
            give_up_after_seconds,
            JOBS_CHANNEL,
        )
    return outcome


__all__ = ["NOW", "Moved", "decide", "lock", "move"]
