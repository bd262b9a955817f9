"""The outbox: notifications recorded in the transaction of the transition that causes them.

Each is one row per matching active subscription, written by a single `INSERT … SELECT` that
finds nothing (an index probe) when the account subscribes to nothing, so a transition pays
one cheap statement for notifications nobody asked for. Delivery is the worker's job
(`app.subscriptions.delivery`); nothing here waits on a lock a transition does not hold already.
"""

from __future__ import annotations

import json
import uuid
from enum import StrEnum

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from app.notifications import JOBS_CHANNEL, notify


class EventType(StrEnum):
    RUN_BLOCKED = "run.blocked"  # a run was recorded as credit-blocked (or retried)
    DECISION_NEEDED = "decision.needed"  # the organization's decision waits on a person
    RUN_RESUMED = "run.resumed"
    RUN_FAILED = "run.failed"  # with `error.code`
    RUN_EXPIRED = "run.expired"
    RUN_CANCELLED = "run.cancelled"


# The event a run's new state announces (states not named announce nothing).
RUN_EVENT_FOR_STATE: dict[str, EventType] = {
    "checking_plan": EventType.RUN_BLOCKED,
    "resumed": EventType.RUN_RESUMED,
    "failed": EventType.RUN_FAILED,
    "expired": EventType.RUN_EXPIRED,
    "cancelled": EventType.RUN_CANCELLED,
}

_TIMESTAMP = """to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')"""


def run_data_sql(
    notify_type: str = "CAST(:notify_type AS text)",
    event: str = "CAST(:event AS text)",
    actor: str = "CAST(:actor AS text)",
    reason: str = "CAST(:reason AS text)",
) -> str:
    """The body of a run event, from a row `b` shaped like blocked_runs (after its change),
    with the event's type, event, actor and reason as SQL expressions (bound parameters by
    default, or columns of `b` where each row has its own, as in a batch of resumes)."""
    return f"""jsonb_build_object(
    'type', {notify_type}, 'timestamp', {_TIMESTAMP},
    'data', jsonb_build_object(
        'blocked_run_id', b.id, 'run_id', b.run_id, 'agent_id', b.agent_id,
        'account_id', b.account_id, 'state', b.state, 'from_state', b.from_state,
        'event', {event}, 'actor', {actor},
        'reason', {reason},
        'error', CASE WHEN b.error_code IS NULL THEN NULL
                      ELSE jsonb_build_object('code', b.error_code, 'message', b.error_message)
                 END))"""


RUN_DATA_SQL = run_data_sql()

# Deliveries for the runs in `b` to their account's subscriptions to :notify_type. Used for
# one run, and as a CTE of the set-based release (`b` is then its `moved` rows, all of one
# account, so the planner looks the account's subscriptions up once, not once per run).
DELIVERIES_FOR_RUNS_SQL = f"""
INSERT INTO notification_deliveries
    (subscription_id, account_id, message_id, event_type, ordering_key, payload)
SELECT s.id, s.account_id, 'msg_' || replace(CAST(gen_random_uuid() AS text), '-', ''),
       CAST(:notify_type AS text), CAST(b.id AS text), {RUN_DATA_SQL}
FROM subscriptions AS s JOIN {{runs}} AS b ON b.account_id = s.account_id
WHERE s.status = 'active' AND CAST(:notify_type AS text) = ANY(s.event_types) {{account}}
"""

# A run's history row and its outbox rows in one statement, so a transition that announces
# something pays no extra round trip for it when nobody subscribed.
_HISTORY_AND_OUTBOX = """
WITH history AS (
    INSERT INTO blocked_run_history (blocked_run_id, from_state, to_state, event, actor, reason)
    VALUES (CAST(:blocked_run_id AS uuid), CAST(:from_state AS text), CAST(:to_state AS text),
            CAST(:event AS text), CAST(:actor AS text), CAST(:reason AS text))
)
""" + DELIVERIES_FOR_RUNS_SQL.format(
    runs="(SELECT r.*, CAST(:from_state AS text) AS from_state FROM blocked_runs AS r "
    "WHERE r.id = CAST(:blocked_run_id AS uuid))",
    account="",
)


def decision_deliveries_sql(decisions: str = "organization_decisions") -> str:
    """`decision.needed` for the account's subscribers, from a row `d` of `decisions` shaped like
    organization_decisions after its move (the table, or the RETURNING rows of the move's own
    statement), with :account_id, :notify_type, :asks, :event and :actor bound."""
    return f"""
INSERT INTO notification_deliveries
    (subscription_id, account_id, message_id, event_type, ordering_key, payload)
SELECT s.id, s.account_id, 'msg_' || replace(CAST(gen_random_uuid() AS text), '-', ''),
       CAST(:notify_type AS text), 'org:' || CAST(d.account_id AS text),
       jsonb_build_object(
           'type', CAST(:notify_type AS text), 'timestamp', {_TIMESTAMP},
           'data', jsonb_build_object(
               'account_id', d.account_id, 'state', d.state, 'asks', CAST(:asks AS jsonb),
               'plan', d.plan, 'plans', d.plans, 'chosen_plan_id', d.chosen_plan_id,
               'checkout_url', d.checkout_url, 'topup', d.topup,
               'event', CAST(:event AS text), 'actor', CAST(:actor AS text),
               'error', CASE WHEN d.error_code IS NULL THEN NULL
                             ELSE jsonb_build_object('code', d.error_code,
                                                     'message', d.error_message)
                        END))
FROM subscriptions AS s JOIN {decisions} AS d ON d.account_id = s.account_id
WHERE s.account_id = CAST(:account_id AS uuid) AND s.status = 'active'
  AND CAST(:notify_type AS text) = ANY(s.event_types)
"""


_DECISION = """
WITH history AS (
    INSERT INTO organization_decision_history
        (account_id, round, from_state, to_state, event, actor, reason)
    VALUES (CAST(:account_id AS uuid), CAST(:round AS integer), CAST(:from_state AS text),
            CAST(:to_state AS text), CAST(:event AS text), CAST(:actor AS text),
            CAST(:reason AS text))
)""" + decision_deliveries_sql()


async def record_history_and_event(
    session: AsyncSession,
    *,
    blocked_run_id: uuid.UUID,
    from_state: str | None,
    to_state: str,
    event: str,
    actor: str,
    reason: str | None,
) -> None:
    """Write a run's history row and the notification its new state announces (`to_state`
    must announce one: see `notify_type_for`) for whoever subscribed to it."""
    result = await session.execute(
        text(_HISTORY_AND_OUTBOX),
        {
            "notify_type": RUN_EVENT_FOR_STATE[to_state].value,
            "blocked_run_id": blocked_run_id,
            "from_state": from_state,
            "to_state": to_state,
            "event": event,
            "actor": actor,
            "reason": reason,
        },
    )
    if result.rowcount:  # type: ignore[attr-defined]
        await notify(session, JOBS_CHANNEL)


async def record_decision_history_and_event(
    session: AsyncSession,
    *,
    account_id: uuid.UUID,
    round: int,
    from_state: str,
    to_state: str,
    event: str,
    actor: str,
    reason: str | None,
    asks: list[str],
) -> None:
    """Write a decision's history row and `decision.needed` (with what is asked) for the
    account's subscribers, if any, in one statement."""
    result = await session.execute(
        text(_DECISION),
        {
            "notify_type": EventType.DECISION_NEEDED.value,
            "account_id": account_id,
            "round": round,
            "from_state": from_state,
            "to_state": to_state,
            "asks": json.dumps(asks),
            "event": event,
            "actor": actor,
            "reason": reason,
        },
    )
    if result.rowcount:  # type: ignore[attr-defined]
        await notify(session, JOBS_CHANNEL)


# The release's outbox step, a CTE over its `moved` rows; it inserts nothing when the target
# state announces nothing (:notify_type is NULL) or nobody subscribed.
RELEASE_CTE = DELIVERIES_FOR_RUNS_SQL.format(
    runs="moved", account="AND s.account_id = CAST(:account_id AS uuid)"
).strip()


def notify_type_for(to_state: str) -> str | None:
    """The event type a run moved into `to_state` announces, if any."""
    event_type = RUN_EVENT_FOR_STATE.get(to_state)
    return event_type.value if event_type else None
