"""A claim takes at most its limit of due jobs, whatever plan PostgreSQL picks for it.

The planner may run a subquery once per outer row (a nested-loop semi join, its choice on a
young table's estimates). A claim written as `UPDATE … WHERE id IN (SELECT … LIMIT n FOR UPDATE
SKIP LOCKED)` then took every due job at once: each rescan skipped the rows just updated and
locked the next n. Here the planner is left no other plan, for every connection to the database.
"""

from __future__ import annotations

import uuid
from datetime import timedelta

import asyncpg
import pytest

from app.database import Database
from app.work_queue import claim_due
from conftest import fresh_database

pytestmark = pytest.mark.asyncio(loop_scope="session")

NESTED_LOOPS_ONLY = (
    "enable_hashagg",
    "enable_hashjoin",
    "enable_mergejoin",
    "enable_material",
    "enable_sort",
)


async def test_a_claim_takes_no_more_than_its_limit_under_a_rescanning_plan() -> None:
    url = await fresh_database("claim_limit")
    dsn = url.replace("postgresql+asyncpg://", "postgresql://")
    conn = await asyncpg.connect(dsn)
    try:
        name = await conn.fetchval("SELECT current_database()")
        for setting in NESTED_LOOPS_ONLY:
            await conn.execute(f'ALTER DATABASE "{name}" SET {setting} = off')
        account = uuid.uuid4()
        await conn.execute(
            "INSERT INTO accounts (id, name, mosaic_api_key_encrypted, webhook_secret_hash)"
            " VALUES ($1, 'claims', 'k', 'h')",
            account,
        )
        await conn.execute(
            "INSERT INTO jobs (kind, account_id, payload, give_up_at)"
            " SELECT 'verify_run', $1, jsonb_build_object('run_id', 'r' || g),"
            " now() + interval '1 hour' FROM generate_series(1, 60) AS g",
            account,
        )
    finally:
        await conn.close()

    db = Database(url)  # new connections: they take the database's settings
    try:
        claimed = await claim_due(db, "w1", limit=8, lease=timedelta(seconds=30))
        again = await claim_due(db, "w2", limit=8, lease=timedelta(seconds=30))
    finally:
        await db.dispose()
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval("SHOW enable_hashagg") == "off"
        leased = await conn.fetch(
            "SELECT locked_by, count(*) AS jobs FROM jobs WHERE locked_until > now()"
            " GROUP BY locked_by ORDER BY locked_by"
        )
    finally:
        await conn.close()
    assert len(claimed) == 8
    assert len(again) == 8
    assert not {job.id for job in claimed} & {job.id for job in again}
    assert [(r["locked_by"], r["jobs"]) for r in leased] == [("w1", 8), ("w2", 8)]
