"""Upkeep that runs once per deployment: expire unanswered runs, prune old inbox rows and steps.

Every worker process runs `run()`, but only the one holding a PostgreSQL advisory lock does the
work. The lock lives on one connection: if that process dies or loses its connection, the lock is
released and another replica takes over at its next try.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from sqlalchemy import Index, select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from app.blocked_runs.models import BlockedRun, Job
from app.blocked_runs.state_machine import WAITING_STATES, Event, transition
from app.organizations.service import CHECKOUT_BATCH, expire_checkouts
from app.runtime import Runtime
from app.subscriptions import delivery as notifications_out

log = logging.getLogger(__name__)

# pg_advisory_lock keys are one shared namespace per database: ours is "unbl" in ASCII.
LOCK_KEY = 0x756E626C
# Rows per statement: short transactions, so pruning never holds locks for long.
BATCH = 500

# The indexes the queries below need (revision 0005), declared beside them so that the models'
# metadata and the migrations agree.
Index("ix_blocked_runs_state_changed", BlockedRun.state, BlockedRun.state_changed_at)
Index(
    "ix_jobs_prunable",
    Job.finished_at,
    postgresql_where=text("blocked_run_id IS NULL AND status <> 'pending'"),
)


async def run(rt: Runtime, stop: asyncio.Event) -> None:
    """Take part in the election until `stop`; while leader, run `maintain` every interval."""
    interval = rt.settings.maintenance_interval.total_seconds()
    while not stop.is_set():
        try:
            async with rt.db.engine.connect() as conn:
                if await _try_lock(conn):
                    await _lead(rt, conn, stop, interval)
        except Exception:
            log.exception("maintenance failed; trying again in %.0fs", interval)
        await _sleep(stop, interval)


async def _try_lock(conn: AsyncConnection) -> bool:
    took = bool(await conn.scalar(text("SELECT pg_try_advisory_lock(:key)"), {"key": LOCK_KEY}))
    await conn.commit()  # a session lock outlives the transaction; keep none open
    return took


async def _lead(rt: Runtime, conn: AsyncConnection, stop: asyncio.Event, interval: float) -> None:
    log.info("maintenance: this process runs the upkeep")
    try:
        while not stop.is_set():
            await maintain(rt)
            await _sleep(stop, interval)
            # Still ours? A broken connection means the lock is gone: leave, and stand again.
            await conn.execute(text("SELECT 1"))
            await conn.commit()
    finally:
        try:
            await conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": LOCK_KEY})
            await conn.commit()
        except Exception:
            # The lock must not go back to the pool with the connection: close it instead.
            await conn.invalidate()


async def _sleep(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


async def maintain(rt: Runtime) -> None:
    """One pass: expire unanswered runs and stale checkouts, prune old webhooks and run-less
    steps (idempotent)."""
    settings = rt.settings
    while await _expire_some(rt) == BATCH:
        pass
    while await expire_checkouts(rt) == CHECKOUT_BATCH:
        pass
    keep = settings.webhook_retention.total_seconds()
    await _delete_in_batches(
        rt,
        "DELETE FROM webhook_events WHERE id IN (SELECT id FROM webhook_events"
        " WHERE received_at < now() - make_interval(secs => :keep) LIMIT :batch)",
        keep,
    )
    # A run's steps (and their last_error) explain it, so they stay as long as the run does;
    # only steps that belong to no run (verifications, the organizations' steps) age out.
    await _delete_in_batches(
        rt,
        "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE blocked_run_id IS NULL"
        " AND status <> 'pending' AND finished_at < now() - make_interval(secs => :keep)"
        " LIMIT :batch)",
        keep,
    )
    await notifications_out.prune(rt, settings.webhook_retention)


async def _expire_some(rt: Runtime) -> int:
    ttl = rt.settings.decision_ttl
    async with rt.db.transaction() as session:
        stale = (
            await session.scalars(
                select(BlockedRun)
                .where(
                    BlockedRun.state.in_([s.value for s in WAITING_STATES]),
                    BlockedRun.state_changed_at
                    < text("now() - make_interval(secs => :ttl)").bindparams(
                        ttl=ttl.total_seconds()
                    ),
                )
                .limit(BATCH)
                .with_for_update(of=BlockedRun, skip_locked=True)
            )
        ).all()
        for blocked in stale:
            await transition(
                session, blocked, Event.EXPIRE, actor="system", reason=f"no answer within {ttl}"
            )
    return len(stale)


async def _delete_in_batches(rt: Runtime, statement: str, keep: float) -> None:
    while True:
        async with rt.db.transaction() as session:
            result = await session.execute(text(statement), {"keep": keep, "batch": BATCH})
        if result.rowcount < BATCH:  # type: ignore[attr-defined]
            return
