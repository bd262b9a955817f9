"""The one-statement webhook path (`app.webhooks.ingest`) against the general one.

A credit-blocked webhook for a run never seen before, whose organization's decision exists and
is not `decided`, is stored and opened in one statement. It must leave exactly what the general
path (`_act` through the ORM) leaves for the same event, in every state of the decision, and
keep the webhook guarantees when deliveries race or a pooled connection dies.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
from sqlalchemy import text

from app.database import compile_named
from app.webhooks import ingest
from app.webhooks.service import _act
from conftest import Stack, Tenant, deliver, finished_event, isolated_stack, make_tenant

pytestmark = pytest.mark.asyncio(loop_scope="session")

PLAN = {"id": "creator", "name": "Creator", "paid": True}
TOPUP = {"enabled": False, "amount": 100, "threshold": 10}


@pytest_asyncio.fixture(loop_scope="session")
async def stack() -> AsyncIterator[Stack]:
    async with isolated_stack("ingest", worker=False) as stack:
        yield stack


@pytest.fixture
def one_statement_answers(monkeypatch: pytest.MonkeyPatch) -> list[bool | None]:
    """What each call of the one-statement path answered (None: it left the event alone)."""
    answers: list[bool | None] = []
    real = ingest.open_first_block

    async def spy(*args: Any, **kwargs: Any) -> bool | None:
        answer = await real(*args, **kwargs)
        answers.append(answer)
        return answer

    monkeypatch.setattr(ingest, "open_first_block", spy)
    return answers


async def _dsn(stack: Stack) -> str:
    return stack.database_url.replace("postgresql+asyncpg://", "postgresql://")


async def _episode(conn: asyncpg.Connection, account_id: str, run_id: str) -> dict[str, Any]:
    run = await conn.fetchrow(
        "SELECT id, state, version, agent_id, plan, topup, chosen_plan_id, checkout_url,"
        " error_code FROM blocked_runs WHERE account_id = $1 AND run_id = $2",
        uuid.UUID(account_id),
        run_id,
    )
    assert run is not None, run_id
    history = await conn.fetch(
        "SELECT from_state, to_state, event, actor, reason FROM blocked_run_history"
        " WHERE blocked_run_id = $1 ORDER BY id",
        run["id"],
    )
    checks = await conn.fetchval(
        "SELECT count(*) FROM jobs WHERE account_id = $1 AND kind = 'check_plan'"
        " AND status = 'pending'",
        uuid.UUID(account_id),
    )
    return {
        **{k: v for k, v in dict(run).items() if k != "id"},
        "history": [tuple(h) for h in history],
        "pending_checks": checks,
    }


async def _set_decision(conn: asyncpg.Connection, tenant: Tenant, state: str) -> None:
    # The decision as its own steps would leave it; its pending steps are dropped so that what
    # each path records is seen on its own.
    await conn.execute(
        "UPDATE organization_decisions SET state = $2, plan = $3::jsonb, topup = $4::jsonb,"
        " chosen_plan_id = $5 WHERE account_id = $1",
        uuid.UUID(tenant.account_id),
        state,
        json.dumps(PLAN),
        json.dumps(TOPUP),
        "creator",
    )
    await conn.execute("DELETE FROM jobs WHERE account_id = $1", uuid.UUID(tenant.account_id))


@pytest.mark.parametrize(
    "decision_state",
    ["idle", "checking_plan", "awaiting_choice", "awaiting_checkout", "topup_prompt"],
)
async def test_one_statement_opens_and_joins_as_the_general_path_does(
    stack: Stack, decision_state: str, one_statement_answers: list[bool | None]
) -> None:
    tenant = await make_tenant(stack.client, stack.mosaic)
    first = await deliver(stack.client, tenant, finished_event(f"run-{uuid.uuid4()}"))
    assert first.json() == {"status": "accepted"}
    assert one_statement_answers == [None]  # the account's first block makes its decision
    conn = await asyncpg.connect(await _dsn(stack))
    try:
        await _set_decision(conn, tenant, decision_state)
        fast_run, general_run = f"run-{uuid.uuid4()}", f"run-{uuid.uuid4()}"
        answer = await deliver(stack.client, tenant, finished_event(fast_run))
        assert answer.status_code == 202
        assert answer.json() == {"status": "accepted"}
        assert one_statement_answers == [None, True]
        fast = await _episode(conn, tenant.account_id, fast_run)

        await _set_decision(conn, tenant, decision_state)
        rt = stack.service.runtime
        async with rt.db.transaction() as session:
            await _act(rt, session, uuid.UUID(tenant.account_id), finished_event(general_run))
        general = await _episode(conn, tenant.account_id, general_run)
    finally:
        await conn.close()
    assert fast == general
    assert fast["history"][0] == (
        None,
        "checking_plan",
        "blocked",
        "mosaic",
        "RUN_FINISHED with the flag",
    )
    assert fast["pending_checks"] == (1 if decision_state == "idle" else 0)


async def test_a_decided_organization_takes_the_general_path(
    stack: Stack, one_statement_answers: list[bool | None]
) -> None:
    tenant = await make_tenant(stack.client, stack.mosaic)
    await deliver(stack.client, tenant, finished_event(f"run-{uuid.uuid4()}"))
    conn = await asyncpg.connect(await _dsn(stack))
    try:
        await _set_decision(conn, tenant, "decided")
        await conn.execute(
            "UPDATE organization_decisions SET decided_at = now() WHERE account_id = $1",
            uuid.UUID(tenant.account_id),
        )
        run_id = f"run-{uuid.uuid4()}"
        answer = await deliver(stack.client, tenant, finished_event(run_id))
        assert answer.json() == {"status": "accepted"}
        run = await _episode(conn, tenant.account_id, run_id)
    finally:
        await conn.close()
    assert one_statement_answers == [None, None]
    # Blocked within the grace after the answer: the answer covers it, so it resumes.
    assert run["state"] == "resuming"


async def test_a_run_opened_by_another_delivery_mid_statement_is_a_duplicate(
    stack: Stack, one_statement_answers: list[bool | None]
) -> None:
    """Two different bodies for one new run: the statement that loses the run's unique index
    stores its event as a duplicate and opens nothing."""
    tenant = await make_tenant(stack.client, stack.mosaic)
    await deliver(stack.client, tenant, finished_event(f"run-{uuid.uuid4()}"))
    run_id = f"run-{uuid.uuid4()}"
    holder = await asyncpg.connect(await _dsn(stack))
    watcher = await asyncpg.connect(await _dsn(stack))
    try:
        # Another delivery's transaction, holding the run's open episode uncommitted.
        tx = holder.transaction()
        await tx.start()
        await holder.execute(
            "INSERT INTO blocked_runs (id, account_id, run_id, state)"
            " VALUES ($1, $2, $3, 'checking_plan')",
            uuid.uuid4(),
            uuid.UUID(tenant.account_id),
            run_id,
        )
        late = asyncio.create_task(
            deliver(stack.client, tenant, finished_event(run_id, status_message="other copy"))
        )

        async def waiting_on_the_run() -> bool:
            # The webhook's statement waits on the uncommitted episode's unique index entry.
            return bool(
                await watcher.fetchval(
                    "SELECT count(*) FROM pg_locks AS l JOIN pg_stat_activity AS a"
                    " ON a.pid = l.pid WHERE NOT l.granted AND l.locktype = 'transactionid'"
                    " AND a.datname = current_database()"
                )
            )

        for _ in range(500):
            if await waiting_on_the_run():
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the webhook never waited on the other delivery's run")
        await tx.commit()
        answer = await late
        assert answer.status_code == 202
        assert answer.json() == {"status": "duplicate"}
        assert one_statement_answers[-1] is False
        runs = await watcher.fetchval(
            "SELECT count(*) FROM blocked_runs WHERE account_id = $1 AND run_id = $2",
            uuid.UUID(tenant.account_id),
            run_id,
        )
        outcomes = await watcher.fetch(
            "SELECT outcome FROM webhook_events WHERE account_id = $1 AND run_id = $2",
            uuid.UUID(tenant.account_id),
            run_id,
        )
    finally:
        await holder.close()
        await watcher.close()
    assert runs == 1
    assert [o["outcome"] for o in outcomes] == ["duplicate"]


async def test_identical_deliveries_at_once_store_one_event_and_open_one_run(
    stack: Stack, one_statement_answers: list[bool | None]
) -> None:
    tenant = await make_tenant(stack.client, stack.mosaic)
    await deliver(stack.client, tenant, finished_event(f"run-{uuid.uuid4()}"))
    run_id = f"run-{uuid.uuid4()}"
    answers = await asyncio.gather(
        *(deliver(stack.client, tenant, finished_event(run_id)) for _ in range(12))
    )
    statuses = sorted(a.json()["status"] for a in answers)
    assert statuses == ["accepted"] + ["duplicate"] * 11
    assert one_statement_answers.count(True) == 1
    rt = stack.service.runtime
    async with rt.db.sessions() as session:
        runs = await session.scalar(
            text("SELECT count(*) FROM blocked_runs WHERE run_id = :r"), {"r": run_id}
        )
        events = await session.scalar(
            text("SELECT count(*) FROM webhook_events WHERE run_id = :r"), {"r": run_id}
        )
    assert (runs, events) == (1, 1)


async def test_a_pooled_connection_the_database_dropped_is_replaced(stack: Stack) -> None:
    tenant = await make_tenant(stack.client, stack.mosaic)
    await deliver(stack.client, tenant, finished_event(f"run-{uuid.uuid4()}"))
    pool = await stack.service.runtime.db.driver_pool()
    assert pool.get_size() >= 1
    # As a database restart or an idle timeout would: every pooled connection is cut.
    conn = await asyncpg.connect(await _dsn(stack))
    try:
        killed = await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    finally:
        await conn.close()
    assert killed >= 1
    run_id = f"run-{uuid.uuid4()}"
    answer = await deliver(stack.client, tenant, finished_event(run_id))
    assert answer.status_code == 202, answer.text
    assert answer.json() == {"status": "accepted"}


async def test_a_connection_that_dies_during_the_statement_is_retried_on_a_new_one(
    stack: Stack,
) -> None:
    """The connection is lost while the statement runs (not while it sat in the pool).

    The statement's first run ends its own backend, as a restart or an administrator would, so
    asyncpg hands the dead connection back to the pool itself while the error is raised; the
    retry runs on a fresh connection and answers.
    """
    db = stack.service.runtime.db
    sequence = f"ingest_attempts_{uuid.uuid4().hex}"
    conn = await asyncpg.connect(await _dsn(stack))
    try:
        await conn.execute(f"CREATE SEQUENCE {sequence}")
        statement = compile_named(
            f"SELECT CASE WHEN nextval('{sequence}') = 1"
            " THEN pg_terminate_backend(pg_backend_pid()) END AS killed,"
            " CAST(:value AS int) AS value"
        )
        row = await ingest._run(db, statement, {"value": 7})
        assert row["value"] == 7
        assert await conn.fetchval(f"SELECT last_value FROM {sequence}") == 2
    finally:
        await conn.execute(f"DROP SEQUENCE IF EXISTS {sequence}")
        await conn.close()


async def test_a_body_with_a_byte_order_mark_is_stored_as_its_json(
    stack: Stack, one_statement_answers: list[bool | None]
) -> None:
    """JSON parsers accept a UTF-8 byte order mark; the stored payload is the JSON itself."""
    tenant = await make_tenant(stack.client, stack.mosaic)
    await deliver(stack.client, tenant, finished_event(f"run-{uuid.uuid4()}"))
    run_id = f"run-{uuid.uuid4()}"
    body = codecs.BOM_UTF8 + json.dumps(finished_event(run_id, status_message="é")).encode()
    answer = await deliver(stack.client, tenant, body)
    assert answer.json() == {"status": "accepted"}, answer.text
    assert one_statement_answers[-1] is True
    rt = stack.service.runtime
    async with rt.db.sessions() as session:
        stored = (
            await session.execute(
                text("SELECT payload, raw_body FROM webhook_events WHERE run_id = :r"),
                {"r": run_id},
            )
        ).one()
    assert stored.payload == finished_event(run_id, status_message="é")
    assert stored.raw_body == body.decode("utf-8")


# --- News of a run running again: open episodes read for many deliveries at once -----------


async def test_news_reads_answer_each_delivery_from_one_statement_per_batch(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read under way holds the next questions back; they go together in one statement, and
    each gets its own run's answer: only an open episode that news could close counts (not one
    being resumed, not a closed one, not another account's)."""
    mine = await make_tenant(stack.client, stack.mosaic)
    other = await make_tenant(stack.client, stack.mosaic)
    states = {"open": "awaiting_choice", "resuming": "resuming", "closed": "resumed"}
    pool = await stack.service.runtime.db.driver_pool()
    for name, state in states.items():
        await pool.execute(
            "INSERT INTO blocked_runs (id, account_id, run_id, state) VALUES ($1, $2, $3, $4)",
            uuid.uuid4(),
            uuid.UUID(mine.account_id),
            f"run-{name}",
            state,
        )
    await pool.execute(
        "INSERT INTO blocked_runs (id, account_id, run_id, state) VALUES ($1, $2, $3, $4)",
        uuid.uuid4(),
        uuid.UUID(other.account_id),
        "run-theirs",
        "awaiting_choice",
    )

    statements: list[int] = []
    first_read_began, first_read_may_end = asyncio.Event(), asyncio.Event()
    real = ingest._run

    async def held(db: Any, statement: Any, values: dict[str, Any], **kw: Any) -> Any:
        statements.append(len(values["run_ids"]))
        if len(statements) == 1:
            first_read_began.set()
            await first_read_may_end.wait()
        return await real(db, statement, values, **kw)

    monkeypatch.setattr(ingest, "_run", held)
    reads = ingest.NewsReads(stack.service.runtime.db)
    account = uuid.UUID(mine.account_id)
    first = asyncio.create_task(reads.awaiting_news(account, "run-open"))
    await first_read_began.wait()
    asked = ["run-open", "run-resuming", "run-closed", "run-never", "run-theirs", "run-open"]
    rest = [asyncio.create_task(reads.awaiting_news(account, run_id)) for run_id in asked]
    theirs = asyncio.create_task(reads.awaiting_news(uuid.UUID(other.account_id), "run-theirs"))
    first_read_may_end.set()
    answers = await asyncio.gather(first, *rest, theirs)
    assert answers == [True, True, False, False, False, False, True, True]
    assert statements == [1, len(asked) + 1]


async def test_a_failed_news_read_fails_each_delivery_of_its_batch_only(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = ingest._run
    calls = 0

    async def failing_once(*args: Any, **kw: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise asyncpg.CannotConnectNowError("the database system is starting up")
        return await real(*args, **kw)

    monkeypatch.setattr(ingest, "_run", failing_once)
    reads = ingest.NewsReads(stack.service.runtime.db)
    account = uuid.uuid4()
    # Three deliveries in one turn of the loop: one batch.
    batch = [asyncio.create_task(reads.awaiting_news(account, f"r{i}")) for i in range(3)]
    outcomes = await asyncio.gather(*batch, return_exceptions=True)
    assert all(isinstance(o, asyncpg.CannotConnectNowError) for o in outcomes), outcomes
    assert await reads.awaiting_news(account, "r0") is False
    assert calls == 2


async def test_constants_are_written_into_a_statement_as_quoted_literals(stack: Stack) -> None:
    """`compile_named(sql, constants)`: only the other binds are sent, and PostgreSQL reads each
    constant back exactly (quotes, an array, a float, NULL, a name used twice)."""
    statement = compile_named(
        "SELECT CAST(:word AS text) AS word, CAST(:words AS text[]) AS words,"
        " CAST(:seconds AS double precision) AS seconds, CAST(:nothing AS text) AS nothing,"
        " CAST(:word AS text) || CAST(:sent AS text) AS both",
        {"word": "it's; --", "words": ["a'b", "c,d", '"e"'], "seconds": 2.5, "nothing": None},
    )
    assert statement.names == ("sent",)
    pool = await stack.service.runtime.db.driver_pool()
    row = await pool.fetchrow(statement.sql, *statement.args({"sent": "!"}))
    assert dict(row) == {
        "word": "it's; --",
        "words": ["a'b", "c,d", '"e"'],
        "seconds": 2.5,
        "nothing": None,
        "both": "it's; --!",
    }


async def test_news_reads_leave_no_delivery_waiting_when_the_reader_is_cancelled(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    began, never = asyncio.Event(), asyncio.Event()

    async def hanging(*_: Any, **__: Any) -> Any:
        began.set()
        await never.wait()

    monkeypatch.setattr(ingest, "_run", hanging)
    reads = ingest.NewsReads(stack.service.runtime.db)
    account = uuid.uuid4()
    reading = asyncio.create_task(reads.awaiting_news(account, "r-read"))
    await began.wait()
    queued = asyncio.create_task(reads.awaiting_news(account, "r-queued"))
    await asyncio.sleep(0)  # queued behind the read under way
    assert reads._reads._task is not None
    reads._reads._task.cancel()
    outcomes = await asyncio.wait_for(asyncio.gather(reading, queued, return_exceptions=True), 5)
    assert all(isinstance(o, asyncio.CancelledError) for o in outcomes), outcomes
