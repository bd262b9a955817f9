"""The webhook hot path: each request in one statement through the asyncpg pool.

Mosaic sends an event for every run, so these paths are the service's busiest. The ORM's unit
of work costs several times what the statements themselves do (a pool pre-ping, a session,
one round trip per statement, a rollback on return); here each request is one prepared
statement, outside any explicit transaction, so one statement is one transaction.

`open_first_block` serves the common credit-blocked webhook: the first report of a run whose
organization's decision exists and is not `decided`. Anything else (an account's first block,
a decided organization, a run that was blocked before) comes back as `None` having written
nothing, and the general path in `app.webhooks.service` takes it, with the same rules.
"""

from __future__ import annotations

import contextlib
import uuid
from typing import Any

import asyncpg

from app import metrics
from app.batching import Coalescer
from app.blocked_runs.state_machine import ACTIVE_STATES, Event, State, target_of
from app.database import Compiled, Database, compile_named
from app.notifications import JOBS_CHANNEL
from app.organizations.service import join_moves
from app.organizations.state_machine import DecisionState
from app.subscriptions import outbox
from app.work_queue import JobKind

# Failures of the connection rather than of the statement (a restarted or terminated backend;
# asyncpg reports a connection the server closed while it sat in the pool in several ways). The
# statement is retried once on a new connection: safe, because it is deduplicated (if the first
# attempt committed, the retry finds the stored event).
_CONNECTION_ERRORS = (
    asyncpg.PostgresConnectionError,
    asyncpg.AdminShutdownError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
)


_FIRST_STATE = target_of(None, Event.BLOCKED)
_MOVES = join_moves()
# Decision states a newly blocked run joins in this statement; `decided` is left to the general
# path (whether the organization's answer covers the run is a question of its own).
_JOINABLE = [DecisionState.IDLE.value, DecisionState.CHECKING_PLAN.value] + [
    move.decision_state.value for move in _MOVES
]
_BLOCKED_RUN = """(SELECT r.id, r.run_id, r.agent_id, r.account_id, r.error_code, r.error_message,
        CAST(:first_state AS text) AS state, CAST(NULL AS text) AS from_state FROM opened AS r)"""

_OPEN_FIRST_BLOCK = compile_named(
    """
WITH decision AS (
    -- Held still (FOR SHARE, as every joining run holds it) while the run joins it as it is.
    SELECT d.state, d.plan, d.topup, d.chosen_plan_id,
           array_position(CAST(:join_states AS text[]), d.state) AS move
    FROM organization_decisions AS d
    WHERE d.account_id = CAST(:account_id AS uuid)
    FOR SHARE
), eligible AS (
    SELECT decision.* FROM decision
    WHERE decision.state = ANY(CAST(:joinable AS text[]))
      AND NOT EXISTS (
          SELECT 1 FROM blocked_runs AS b
          WHERE b.account_id = CAST(:account_id AS uuid) AND b.run_id = CAST(:run_id AS text))
), stored AS (
    INSERT INTO webhook_events (account_id, dedup_key, flag, run_id, payload, raw_body, outcome)
    SELECT CAST(:account_id AS uuid), CAST(:dedup_key AS text), CAST(:flag AS text),
           CAST(:run_id AS text), CAST(CAST(:payload AS text) AS jsonb),
           CAST(:raw_body AS text), 'accepted'
    FROM eligible
    ON CONFLICT DO NOTHING
    RETURNING id
), opened AS (
    -- The run's one open episode (a unique index), in the state its decision puts it in.
    INSERT INTO blocked_runs
        (id, account_id, run_id, agent_id, state, version, plan, topup, chosen_plan_id)
    SELECT CAST(:new_id AS uuid), CAST(:account_id AS uuid), CAST(:run_id AS text),
           CAST(:agent_id AS text),
           COALESCE((CAST(:join_targets AS text[]))[e.move], CAST(:first_state AS text)),
           CASE WHEN e.move IS NULL THEN 1 ELSE 2 END,
           CASE WHEN e.move IS NOT NULL THEN e.plan END,
           CASE WHEN e.move IS NOT NULL THEN e.topup END,
           CASE WHEN e.move IS NOT NULL THEN e.chosen_plan_id END
    FROM eligible AS e, stored
    ON CONFLICT DO NOTHING
    RETURNING id, account_id, run_id, agent_id, state, error_code, error_message
), history AS (
    -- Blocked (by the sender), then joined (by the system), in that order.
    INSERT INTO blocked_run_history (blocked_run_id, from_state, to_state, event, actor, reason)
    SELECT o.id, h.from_state, h.to_state, h.event, h.actor, h.reason
    FROM opened AS o, eligible AS e,
         LATERAL (VALUES
             (1, CAST(NULL AS text), CAST(:first_state AS text), CAST(:event AS text),
              CAST(:actor AS text), CAST(:reason AS text)),
             (2, CAST(:first_state AS text), o.state, (CAST(:join_events AS text[]))[e.move],
              CAST(:system AS text), (CAST(:join_reasons AS text[]))[e.move])
         ) AS h (step, from_state, to_state, event, actor, reason)
    WHERE h.step = 1 OR e.move IS NOT NULL
    ORDER BY h.step
), checked AS (
    -- The plan is a question again: the decision's check (one pending per organization).
    INSERT INTO jobs (kind, account_id, give_up_at)
    SELECT CAST(:check_plan AS text), CAST(:account_id AS uuid),
           now() + make_interval(secs => CAST(:give_up AS double precision))
    FROM opened, eligible AS e
    WHERE e.state = CAST(:idle AS text)
    ON CONFLICT DO NOTHING
    RETURNING id
), announced AS (
    """
    + outbox.DELIVERIES_FOR_RUNS_SQL.format(runs=_BLOCKED_RUN, account="")
    + """
    RETURNING 1
)
SELECT (SELECT count(*) FROM eligible) AS eligible,
       (SELECT id FROM stored) AS event_id,
       (SELECT state FROM opened) AS state,
       -- No NOTIFY of the new run on `unblock_run_events`: only streams and waits that know a
       -- run's id listen for it, and this run's id did not exist before this statement. (A
       -- NOTIFY also serializes committing transactions on PostgreSQL's notification queue.)
       (SELECT count(pg_notify(CAST(:jobs AS text), ''))
        FROM (SELECT 1 FROM checked UNION ALL SELECT 1 FROM announced LIMIT 1) AS w) AS woken
""",
    {
        "system": "system",
        "event": Event.BLOCKED.value,
        "first_state": _FIRST_STATE.value,
        "joinable": _JOINABLE,
        "join_states": [move.decision_state.value for move in _MOVES],
        "join_events": [move.event.value for move in _MOVES],
        "join_targets": [move.run_state.value for move in _MOVES],
        "join_reasons": [move.reason for move in _MOVES],
        "idle": DecisionState.IDLE.value,
        "check_plan": JobKind.CHECK_PLAN.value,
        "notify_type": outbox.notify_type_for(_FIRST_STATE.value),
        "jobs": JOBS_CHANNEL,
    },
)

_MARK_DUPLICATE = compile_named(
    "UPDATE webhook_events SET outcome = 'duplicate' WHERE id = CAST(:event_id AS bigint)"
)

_NEWS_STATES = sorted(s.value for s in ACTIVE_STATES if s is not State.RESUMING)
_AWAITING_NEWS = compile_named(
    """
SELECT k.i
FROM unnest(CAST(:account_ids AS uuid[]), CAST(:run_ids AS text[]))
         WITH ORDINALITY AS k (account_id, run_id, i),
     -- LIMIT keeps this a lookup per run on (account_id, run_id), whatever the statistics say.
     LATERAL (SELECT 1 FROM blocked_runs AS b
              WHERE b.account_id = k.account_id AND b.run_id = k.run_id
                AND b.state = ANY(CAST(:states AS text[]))
              LIMIT 1) AS open_episode
""",
    {"states": _NEWS_STATES},
)


async def _run(
    db: Database, statement: Compiled, values: dict[str, Any], *, many: bool = False
) -> Any:
    """The statement's first row (all its rows with `many`), on a pooled connection."""
    pool = await db.driver_pool()
    for attempt in (1, 2):
        async with pool.acquire() as conn:
            try:
                args = statement.args(values)
                if many:
                    return await conn.fetch(statement.sql, *args)
                return await conn.fetchrow(statement.sql, *args)
            except _CONNECTION_ERRORS:
                # Never back into the pool: it is replaced by a new connection on next use. A
                # connection the server closed has already handed itself back (asyncpg detaches
                # the proxy as it cleans up), and then there is nothing left to terminate.
                with contextlib.suppress(asyncpg.InterfaceError):
                    conn.terminate()
                if attempt == 2:
                    raise
    raise AssertionError("unreachable")


async def open_first_block(
    db: Database,
    *,
    account_id: uuid.UUID,
    run_id: str,
    agent_id: str | None,
    flag: str,
    dedup_key: str,
    payload: str,
    raw_body: str,
    actor: str,
    reason: str,
    give_up_seconds: float,
) -> bool | None:
    """Store a credit-blocked event and open its run in one statement.

    True: stored, and the run's episode opened; False: a copy (of a stored event, or of a run
    whose episode another delivery opened a moment before); None: not this path, nothing written.
    """
    new_id = uuid.uuid4()
    row = await _run(
        db,
        _OPEN_FIRST_BLOCK,
        {
            "account_id": account_id,
            "run_id": run_id,
            "agent_id": agent_id,
            "flag": flag,
            "dedup_key": dedup_key,
            "payload": payload,
            "raw_body": raw_body,
            "new_id": new_id,
            "actor": actor,
            "reason": reason,
            "give_up": give_up_seconds,
        },
    )
    if not row["eligible"]:
        return None
    if row["event_id"] is None:
        return False
    if row["state"] is None:
        # Stored, but another delivery opened the run's episode a moment before this one.
        await _run(db, _MARK_DUPLICATE, {"event_id": row["event_id"]})
        return False
    metrics.TRANSITIONS.labels("", _FIRST_STATE.value).inc()
    if row["state"] != _FIRST_STATE.value:
        metrics.TRANSITIONS.labels(_FIRST_STATE.value, row["state"]).inc()
    return True


class NewsReads:
    """Whether a run has an open episode that news of it running again could close, read for
    many deliveries at once.

    Half of what Mosaic sends is such news (`RUN_STARTED`, completed runs), nearly always for a
    run with nothing open, and only the database knows across replicas. Batched as outcomes are
    (`app.batching.Coalescer`): under load one statement on one pooled connection answers a
    whole batch. A failed read raises its error in every delivery of its batch (each answered
    503 or 500 as before, and Mosaic delivers again).
    """

    def __init__(self, db: Database, *, limit: int = 500) -> None:
        self._db = db
        self._reads: Coalescer[tuple[uuid.UUID, str], bool] = Coalescer(self._read, limit=limit)

    async def awaiting_news(self, account_id: uuid.UUID, run_id: str) -> bool:
        return await self._reads.submit((account_id, run_id))

    async def _read(self, batch: list[tuple[uuid.UUID, str]]) -> list[bool | Exception]:
        rows = await _run(
            self._db,
            _AWAITING_NEWS,
            {
                "account_ids": [account_id for account_id, _ in batch],
                "run_ids": [run_id for _, run_id in batch],
            },
            many=True,
        )
        found = {row[0] for row in rows}
        return [position in found for position in range(1, len(batch) + 1)]
