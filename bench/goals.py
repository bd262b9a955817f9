"""The performance goals (P1–P5, steps), each a ratio against a bare baseline in the same run.

Baselines are real processes measured in slices interleaved with unblock's, on the same
PostgreSQL, with the same uvicorn settings (uvloop, httptools, one worker): `bench/bare.py`
(one durable INSERT; no database at all), and for P3 a raw httpx resume loop. Ratios are
printed with the goal beside them, PASS or MISS; only correctness problems fail the run.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
from sqlalchemy.engine import make_url

from app.auth import mint_token
from bench import drive, loadgen, procstat
from bench.env import (
    ADMIN,
    JWT_SECRET,
    LOOPBACK,
    Child,
    Tenant,
    _wait_ready,
    bearer,
    bench_settings,
    children,
    free_port,
    fresh_database,
    make_tenant,
    spawn,
    start_service,
)
from bench.ingest import finished_payload

MIB = 1024
RSS_LIMIT_MIB = 150
# Flat: the last slice's peak within this much of the first's, however many requests came between.
RSS_FLAT_MIB = 4


@dataclass
class Goal:
    """One goal's verdict: measured against baseline, the ratio, and the bound it must meet."""

    name: str
    what: str
    baseline: str
    measured: str
    value: float
    bound: float
    at_least: bool  # the value must be >= bound (else <=)
    note: str = ""

    @property
    def passed(self) -> bool:
        return self.value >= self.bound if self.at_least else self.value <= self.bound

    def line(self) -> str:
        sign = ">=" if self.at_least else "<="
        verdict = "PASS" if self.passed else "MISS"
        return (
            f"  {self.name:<6} {self.what:<44} {self.baseline:>16} {self.measured:>16} "
            f"{self.value:>8.2f} {sign} {self.bound:<6g} {verdict}"
            + (f"  ({self.note})" if self.note else "")
        )


def header() -> str:
    return (
        f"  {'goal':<6} {'what':<44} {'baseline':>16} {'unblock':>16} {'value':>8} "
        f"{'goal':<9} verdict"
    )


@dataclass
class GoalOutcome:
    goals: list[Goal] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def merge(self, other: GoalOutcome) -> None:
        self.goals += other.goals
        self.lines += other.lines
        self.problems += other.problems


async def start_bare(database_url: str) -> Child:
    """The bare baseline server (bench/bare.py) in its own process."""
    port = free_port()
    process = spawn(
        ["-m", "bench.bare", "--port", str(port)],
        env={"UNBLOCK_BENCH_DATABASE_URL": database_url},
    )
    child = Child("bare", f"http://{LOOPBACK}:{port}", process)
    await _wait_ready(child, "/healthz")
    return child


def port_of(child: Child) -> int:
    return int(httpx.URL(child.url).port or 0)


def progress_payload(run_id: str, index: int) -> dict[str, Any]:
    """An event unblock ignores: RUN_PROGRESS, or a completed run it never saw blocked."""
    if index % 2:
        return {
            "flag": "RUN_FINISHED",
            "agent_id": f"agent-{index % 17}",
            "run_id": run_id,
            "status": "completed",
            "needs_credits": False,
            "node_status_counts": {"completed": 4},
            "outputs": [],
        }
    return {
        "flag": "RUN_PROGRESS",
        "agent_id": f"agent-{index % 17}",
        "run_id": run_id,
        "status": "running",
        "node_status_counts": {"completed": 2, "running": 1, "pending": 1},
    }


def _bodies(count: int, make: Callable[[str, int], dict[str, Any]]) -> list[bytes]:
    return [json.dumps(make(str(uuid.uuid4()), i)).encode() for i in range(count)]


def _posts(port: int, path: str, bodies: list[bytes], headers: dict[str, str]) -> list[bytes]:
    all_headers = {"Content-Type": "application/json", **headers}
    return [loadgen.request_bytes("POST", path, port, body, all_headers) for body in bodies]


@dataclass
class IngestConfig:
    connections: int = 64
    seconds: float = 5.0
    slices: int = 2
    pool: int = 30_000  # distinct requests prepared per slice (wrk cycles through them)
    fallback: int = 2_000  # requests per slice when the Python load generator stands in


def _pool(config: IngestConfig) -> int:
    return config.pool if drive.tool() == "wrk" else config.fallback


def _blocked(payload_run: str, index: int) -> dict[str, Any]:
    return finished_payload(payload_run, f"agent-{index % 17}", message="Insufficient credits")


async def ingest_goals(
    database_url: str,
    service: Child,
    bare: Child,
    api: httpx.AsyncClient,
    sandbox: httpx.AsyncClient,
    config: IngestConfig,
) -> GoalOutcome:
    """P1 (ingest vs one INSERT), P2 (ignored event vs no database), P5 (RSS under P1)."""
    out = GoalOutcome()
    tenant = await make_tenant(api, sandbox)
    service_port, bare_port = port_of(service), port_of(bare)
    signed = {"X-Mosaic-Signature": tenant.webhook_secret}
    database = make_url(database_url).database or ""
    loads = {name: drive.Load() for name in ("insert", "ingest", "ping", "ignored")}
    ingest_cpu, ignored_cpu = procstat.Cpu(), procstat.Cpu()
    memory: list[procstat.Usage] = []
    pool = _pool(config)
    # Warm both servers (imports, pools, caches) before anything is measured.
    warm = _posts(service_port, tenant.webhook_path, _bodies(200, _blocked), signed)
    await loadgen.run(service_port, warm, concurrency=8)
    await loadgen.run(
        bare_port, _posts(bare_port, "/insert", _bodies(200, _blocked), {}), concurrency=8
    )
    for _ in range(config.slices):
        requests = _posts(bare_port, "/insert", _bodies(pool, _blocked), {})
        loads["insert"].merge(
            await drive.run(
                bare_port, requests, connections=config.connections, seconds=config.seconds
            )
        )
        requests = _posts(service_port, tenant.webhook_path, _bodies(pool, _blocked), signed)
        with procstat.cpu(service.pid, database) as used:
            async with procstat.watch(service.pid) as usage:
                loads["ingest"].merge(
                    await drive.run(
                        service_port,
                        requests,
                        connections=config.connections,
                        seconds=config.seconds,
                    )
                )
        ingest_cpu.add(used)
        memory.append(usage)
        requests = _posts(bare_port, "/ping", _bodies(pool, progress_payload), {})
        loads["ping"].merge(
            await drive.run(
                bare_port, requests, connections=config.connections, seconds=config.seconds
            )
        )
        requests = _posts(
            service_port, tenant.webhook_path, _bodies(pool, progress_payload), signed
        )
        with procstat.cpu(service.pid, database) as used:
            loads["ignored"].merge(
                await drive.run(
                    service_port, requests, connections=config.connections, seconds=config.seconds
                )
            )
        ignored_cpu.add(used)

    for name, load in loads.items():
        if load.bad:
            out.problems.append(f"{name}: {load.bad} requests failed or were not answered 2xx")
    out.problems += await _check_ingest(database_url, tenant, loads["ingest"], config)

    p1 = loads["ingest"].rate / loads["insert"].rate if loads["insert"].rate else 0.0
    out.goals.append(
        Goal(
            "P1",
            "signed needs_credits webhook vs bare INSERT",
            f"{loads['insert'].rate:,.0f}/s",
            f"{loads['ingest'].rate:,.0f}/s",
            p1,
            0.6,
            True,
        )
    )
    out.goals.append(
        Goal(
            "P1",
            f"  webhook p99 (ms) at {config.connections} connections",
            f"{loads['insert'].p99:.1f}",
            f"{loads['ingest'].p99:.1f}",
            loads["ingest"].p99,
            50,
            False,
        )
    )
    p2 = loads["ignored"].rate / loads["ping"].rate if loads["ping"].rate else 0.0
    out.goals.append(
        Goal(
            "P2",
            "ignored event vs bare no-database endpoint",
            f"{loads['ping'].rate:,.0f}/s",
            f"{loads['ignored'].rate:,.0f}/s",
            p2,
            0.8,
            True,
        )
    )
    peaks = [u.peak_kib / MIB for u in memory]
    out.goals.append(
        Goal(
            "P5",
            "service peak RSS under P1 (MiB)",
            f"{RSS_LIMIT_MIB} MiB",
            " / ".join(f"{p:.1f}" for p in peaks),
            max(peaks),
            RSS_LIMIT_MIB,
            False,
            memory[0].method,
        )
    )
    out.goals.append(
        Goal(
            "P5",
            "  RSS peak growth, first to last slice (MiB)",
            f"{RSS_FLAT_MIB} MiB",
            f"{loads['ingest'].requests:,} req",
            peaks[-1] - peaks[0],
            RSS_FLAT_MIB,
            False,
        )
    )
    per = lambda cpu, load: f"{cpu * 1000 / max(load.requests, 1):.2f} ms"  # noqa: E731
    out.lines += [
        f"  load generator: {drive.tool()}, {config.connections} connections, "
        f"{config.slices} interleaved slices of {config.seconds:g} s per kind",
        "  load generator CPU per request (ms): "
        + ", ".join(
            f"{n} {ld.client_cpu * 1000 / max(ld.requests, 1):.3f}" for n, ld in loads.items()
        ),
        f"  service CPU per webhook {per(ingest_cpu.other, loads['ingest'])}, Postgres "
        f"{per(ingest_cpu.postgres, loads['ingest'])}; per ignored event "
        f"{per(ignored_cpu.other, loads['ignored'])}, "
        f"Postgres {per(ignored_cpu.postgres, loads['ignored'])}",
        f"  latency p50/p99 (ms): bare INSERT {loads['insert'].p50:.1f}/{loads['insert'].p99:.1f}, "
        f"webhook {loads['ingest'].p50:.1f}/{loads['ingest'].p99:.1f}, no-DB "
        f"{loads['ping'].p50:.1f}/{loads['ping'].p99:.1f}, ignored "
        f"{loads['ignored'].p50:.1f}/{loads['ignored'].p99:.1f}",
    ]
    return out


async def _check_ingest(
    database_url: str, tenant: Tenant, ingest: drive.Load, config: IngestConfig
) -> list[str]:
    """Every answered webhook opened exactly one blocked run, stored once; none lost."""
    conn = await asyncpg.connect(_dsn(database_url))
    try:
        account = uuid.UUID(tenant.account_id)
        runs = await conn.fetchval(
            "SELECT count(*) FROM blocked_runs WHERE account_id = $1", account
        )
        twice = await conn.fetchval(
            "SELECT count(*) FROM (SELECT run_id FROM blocked_runs WHERE account_id = $1 "
            "GROUP BY run_id HAVING count(*) > 1) t",
            account,
        )
        stored = await conn.fetchval(
            "SELECT count(DISTINCT run_id) FROM webhook_events WHERE account_id = $1 "
            "AND flag = 'RUN_FINISHED' AND payload->>'status' = 'failed'",
            account,
        )
    finally:
        await conn.close()
    problems = []
    warmup = 200
    answered = ingest.requests + warmup
    in_flight = config.connections * config.slices  # sent, still open when the slice ended
    if twice:
        problems.append(f"P1: {twice} runs opened twice")
    if stored != runs:
        problems.append(f"P1: {stored} distinct blocked webhooks stored, {runs} runs opened")
    wrapped = ingest.requests > _pool(config) * config.slices
    if not wrapped and not answered <= runs <= answered + in_flight:
        problems.append(f"P1: {answered} webhooks answered 202 but {runs} runs opened")
    return problems


SEED_ACCOUNTS = """
INSERT INTO accounts (id, name, mosaic_api_key_encrypted, webhook_secret_hash)
SELECT gen_random_uuid(), 'bench reads ' || g, a.mosaic_api_key_encrypted, a.webhook_secret_hash
FROM accounts a, generate_series(1, $2::int) g WHERE a.id = $1
"""
# Spread over the accounts, the tenant's first; about 1.3 % resuming with a pending resume job
# (13k at 1M rows, as a large release in flight leaves them), 1 % waiting on a decision.
SEED_RUNS = """
INSERT INTO blocked_runs (id, account_id, run_id, agent_id, state, created_at, updated_at,
                          state_changed_at)
SELECT gen_random_uuid(), ($1::uuid[])[1 + g % cardinality($1::uuid[])], 'seed-' || g,
       'agent-' || (g % 17),
       CASE WHEN g % 77 = 0 THEN 'resuming' WHEN g % 101 = 0 THEN 'awaiting_choice'
            WHEN g % 5 = 0 THEN 'cancelled' ELSE 'resumed' END,
       t, t, t
FROM generate_series(1, $2::int) g, LATERAL (SELECT now() - make_interval(secs => g)) AS s(t)
"""
SEED_JOBS = """
INSERT INTO jobs (kind, account_id, blocked_run_id, status, run_after, give_up_at)
SELECT 'resume', account_id, id, 'pending', now() + interval '1 day', now() + interval '2 days'
FROM blocked_runs WHERE state = 'resuming'
"""


def _dsn(database_url: str) -> str:
    return make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)


async def _seed_reads(database_url: str, tenant: Tenant, rows: int, accounts: int) -> list[str]:
    """`rows` blocked runs over `accounts` accounts (set-based); the tenant's run ids to get."""
    conn = await asyncpg.connect(_dsn(database_url))
    try:
        account = uuid.UUID(tenant.account_id)
        if accounts > 1:
            await conn.execute(SEED_ACCOUNTS, account, accounts - 1)
        ids = await conn.fetchval(
            "SELECT array_agg(id ORDER BY id <> $1, id) FROM accounts", account
        )
        await conn.execute(SEED_RUNS, ids, rows)
        await conn.execute(SEED_JOBS)
        await conn.execute("ANALYZE")
        picked = await conn.fetch(
            "SELECT id FROM blocked_runs WHERE account_id = $1 ORDER BY random() LIMIT 1000",
            account,
        )
    finally:
        await conn.close()
    return [str(row["id"]) for row in picked]


async def read_goals(
    sandbox_proc: Child, sandbox: httpx.AsyncClient, large_rows: int, seconds: float
) -> GoalOutcome:
    """P4: list and get p50 with `large_rows` blocked runs (100 accounts) against 1,000 (one)."""
    out = GoalOutcome()
    sides: dict[str, tuple[Child, list[bytes], list[bytes]]] = {}
    async with children() as running:
        for side, rows, accounts in (("1k", 1_000, 1), ("large", large_rows, 100)):
            database_url = await fresh_database(f"reads_{side}")
            service = await start_service(database_url, sandbox_proc.url, worker=False)
            running.append(service)
            async with httpx.AsyncClient(base_url=service.url, timeout=60) as api:
                tenant = await make_tenant(api, sandbox)
            ids = await _seed_reads(database_url, tenant, rows, accounts)
            token = mint_token(
                JWT_SECRET, sub="bench-reader", scopes=["runs:read"], account_id=tenant.account_id
            )
            port = port_of(service)
            auth = bearer(token)
            lists = [loadgen.request_bytes("GET", "/v1/blocked-runs", port, headers=auth)] * 2000
            gets = [
                loadgen.request_bytes("GET", f"/v1/blocked-runs/{i}", port, headers=auth)
                for i in ids
            ] * 2
            sides[side] = (service, lists, gets)
        loads = {(side, kind): drive.Load() for side in sides for kind in ("list", "get")}
        for _ in range(2):
            for kind in ("list", "get"):
                for side, (service, lists, gets) in sides.items():
                    requests = lists if kind == "list" else gets
                    if drive.tool() != "wrk":
                        requests = requests[:1000]
                    loads[side, kind].merge(
                        await drive.run(port_of(service), requests, connections=16, seconds=seconds)
                    )
    for key, load in loads.items():
        if load.bad:
            out.problems.append(f"P4 {key}: {load.bad} requests failed or were not answered 2xx")
    for kind, what in (
        ("list", "first page of GET /v1/blocked-runs"),
        ("get", "GET /v1/blocked-runs/{id}"),
    ):
        small, large = loads["1k", kind], loads["large", kind]
        out.goals.append(
            Goal(
                "P4",
                f"{what} p50 (ms), {large_rows:,} vs 1,000 rows",
                f"{small.p50:.1f} ms",
                f"{large.p50:.1f} ms",
                large.p50 / small.p50 if small.p50 else 0.0,
                1.5,
                False,
            )
        )
    out.lines.append(
        "  P4 throughput (req/s), 1k vs large: "
        + ", ".join(
            f"{kind} {loads['1k', kind].rate:,.0f} vs {loads['large', kind].rate:,.0f}"
            for kind in ("list", "get")
        )
        + " (wrk, 16 connections)"
    )
    return out


RELEASE_TIMEOUT = 900.0
POLL = 0.25  # the release is watched through the database; no event reaches this process


async def _sandbox_runs(sandbox: httpx.AsyncClient, organization_id: str, count: int) -> list[str]:
    """`count` runs of a one-node organization with no credits: each fails for credits."""
    semaphore = asyncio.Semaphore(16)

    async def start(i: int) -> str:
        async with semaphore:
            body = {"organization_id": organization_id, "agent_id": f"agent-{i % 17}"}
            answer = await sandbox.post("/_sandbox/runs", json=body)
            return str(answer.raise_for_status().json()["run_id"])

    run_ids = await asyncio.gather(*(start(i) for i in range(count)))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # every run fails within a few step delays
        last = (await sandbox.get(f"/_sandbox/runs/{run_ids[-1]}")).json()
        if last["status"] == "failed":
            return list(run_ids)
        await asyncio.sleep(POLL)
    raise RuntimeError("the sandbox's runs did not fail for credits in time")


async def _org(sandbox: httpx.AsyncClient, secret: str | None = None) -> dict[str, str]:
    spec: dict[str, Any] = {"plan_id": None, "balance": 0, "checkout": False, "nodes_per_run": 1}
    if secret:
        spec["webhook_secret"] = secret
    return dict((await sandbox.post("/_sandbox/orgs", json=spec)).raise_for_status().json())


async def _resumes(sandbox: httpx.AsyncClient, api_key: str) -> Counter[str]:
    calls = await sandbox.get(
        "/_sandbox/calls",
        params={"api_key": api_key, "method": "POST", "path": "/agent_run/*/resume"},
    )
    return Counter(call["path"].split("/")[2] for call in calls.raise_for_status().json())


async def _raw_resume_loop(
    sandbox: httpx.AsyncClient, runs: int, concurrency: int
) -> tuple[float, list[str]]:
    """The baseline: `runs` resume calls to the sandbox from a bare httpx loop."""
    org = await _org(sandbox)
    run_ids = await _sandbox_runs(sandbox, org["organization_id"], runs)
    queue = list(reversed(run_ids))
    statuses: Counter[int] = Counter()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"Authorization": f"Bearer {org['api_key']}"}
    async with httpx.AsyncClient(base_url=str(sandbox.base_url), limits=limits) as client:

        async def loop() -> None:
            while queue:
                run_id = queue.pop()
                answer = await client.post(f"/agent_run/{run_id}/resume", headers=headers)
                statuses[answer.status_code] += 1

        started = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    problems = [] if statuses == Counter({200: runs}) else [f"P3 baseline: statuses {statuses}"]
    seen = await _resumes(sandbox, org["api_key"])
    if sorted(seen) != sorted(run_ids) or set(seen.values()) != {1}:
        problems.append("P3 baseline: not every run resumed exactly once")
    return seconds, problems


async def release_goal(sandbox_proc: Child, sandbox: httpx.AsyncClient, runs: int) -> GoalOutcome:
    """P3: one decision releases `runs` blocked runs against a raw httpx resume loop.

    One needs_credits webhook makes the organization's plan a question (the real check_plan
    step); the other runs join it set-based in SQL, in `awaiting_choice`, each a failed run
    in the sandbox. Then choose-plan and the top-up answer, and the clock runs until every run
    is `resumed`; the sandbox's call log must show one resume per run.
    """
    out = GoalOutcome()
    concurrency = bench_settings(0, sandbox_proc.url).worker_concurrency
    baseline, problems = await _raw_resume_loop(sandbox, runs, concurrency)
    out.problems += problems
    database_url = await fresh_database("release")
    async with children() as running:
        service = await start_service(database_url, sandbox_proc.url, worker=True)
        running.append(service)
        async with httpx.AsyncClient(base_url=service.url, timeout=120) as api:
            secret = "whsec_" + uuid.uuid4().hex
            org = await _org(sandbox, secret)
            body = {"name": "Bench Org", "mosaic_api_key": org["api_key"], "webhook_secret": secret}
            account = (await api.post("/v1/accounts", headers=ADMIN, json=body)).raise_for_status()
            account_id, path = account.json()["id"], httpx.URL(account.json()["webhook_url"]).path
            run_ids = await _sandbox_runs(sandbox, org["organization_id"], runs)
            first = json.dumps(_blocked(run_ids[0], 0)).encode()
            headers = {"X-Mosaic-Signature": secret, "Content-Type": "application/json"}
            (await api.post(path, content=first, headers=headers)).raise_for_status()
            token = mint_token(
                JWT_SECRET,
                sub="bench-person",
                scopes=["runs:read", "runs:write"],
                account_id=account_id,
            )
            person = bearer(token)
            await _decision_in(api, person, "awaiting_choice")
            seeded = await _join_runs(database_url, account_id, run_ids[1:])
            started = time.perf_counter()
            cpu_before = procstat.cpu_seconds(service.pid)
            answer = await api.post(
                "/v1/organization/choose-plan", headers=person, json={"plan_id": "creator"}
            )
            answer.raise_for_status()
            await _decision_in(api, person, "topup_prompt")
            asked = time.perf_counter() - started
            topup_started = time.perf_counter()
            answer = await api.post(
                "/v1/organization/topup", headers=person, json={"enable": False}
            )
            answer.raise_for_status()
            topup_open = time.perf_counter() - topup_started
            resumed = await _all_resumed(database_url, account_id, runs, started)
            seconds = time.perf_counter() - started
            service_cpu = procstat.cpu_seconds(service.pid) - cpu_before
        seen = await _resumes(sandbox, org["api_key"])
    if resumed != runs:
        out.problems.append(f"P3: {resumed} of {runs} runs resumed within {RELEASE_TIMEOUT:g}s")
    if sorted(seen) != sorted(run_ids) or set(seen.values()) != {1}:
        twice = sum(1 for n in seen.values() if n > 1)
        out.problems.append(
            f"P3: {len(seen)} of {runs} runs resumed in the sandbox, {twice} more than once"
        )
    out.goals.append(
        Goal(
            "P3",
            f"one decision releases {runs:,} runs vs raw httpx",
            f"{baseline:.1f} s",
            f"{seconds:.1f} s",
            seconds / baseline if baseline else 0.0,
            1.5,
            False,
        )
    )
    out.lines.append(
        f"  P3: {seeded + 1:,} runs waiting; concurrency {concurrency} (worker_concurrency); "
        f"choose-plan to topup_prompt {asked:.1f} s, the top-up answer's request open "
        f"{topup_open:.1f} s; {runs / seconds:,.0f} resumes/s against {runs / baseline:,.0f}/s; "
        f"serve process CPU {service_cpu:.1f} s in {seconds:.1f} s"
    )
    return out


async def _decision_in(api: httpx.AsyncClient, person: dict[str, str], state: str) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        body = (await api.get("/v1/organization", headers=person)).raise_for_status().json()
        if body["state"] == state and not body["pending"]:
            return
        await asyncio.sleep(POLL)
    raise RuntimeError(f"the decision did not reach {state}: {body}")


JOIN_RUNS = """
INSERT INTO blocked_runs (id, account_id, run_id, agent_id, state, plan, plans)
SELECT gen_random_uuid(), d.account_id, r.run_id, 'agent-0', 'awaiting_choice', d.plan, d.plans
FROM organization_decisions d, unnest($2::text[]) AS r(run_id)
WHERE d.account_id = $1
"""


async def _join_runs(database_url: str, account_id: str, run_ids: list[str]) -> int:
    """The rest of the organization's runs, waiting on its decision (set-based)."""
    conn = await asyncpg.connect(_dsn(database_url))
    try:
        status = await conn.execute(JOIN_RUNS, uuid.UUID(account_id), run_ids)
        await conn.execute("ANALYZE")
    finally:
        await conn.close()
    return int(status.split()[-1])


async def _all_resumed(database_url: str, account_id: str, runs: int, started: float) -> int:
    conn = await asyncpg.connect(_dsn(database_url))
    resumed = 0
    try:
        while time.perf_counter() - started < RELEASE_TIMEOUT:
            resumed = await conn.fetchval(
                "SELECT count(*) FROM blocked_runs WHERE account_id = $1 AND state = 'resumed'",
                uuid.UUID(account_id),
            )
            if resumed >= runs:
                break
            await asyncio.sleep(POLL)
    finally:
        await conn.close()
    return int(resumed)
