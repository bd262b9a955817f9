"""Benchmark 2: worker throughput and scaling, draining check_plan jobs.

The benchmark has a database of its own (no one else's pending work to drain). A check_plan is
an organization's (its decision reads the plan once for all its runs), so each round gets M free
sandbox organizations, accounts stored with the service's own code, and one fresh blocked run
each, opened with `open_blocked_run` (which records the decision's check_plan job in the run's
own transaction), with no worker running. Then the round's workers start and the clock runs
until no job of the round is pending. A check_plan for a free organization is GET /plan, then
GET /plan/list, then the decision and its run move to awaiting_choice and record no further job.

Rounds:
- baseline: one `app.worker.Worker` on one `Runtime`, in this process;
- N Workers in this process, each on its own Runtime (own pool and LISTEN connection): what
  the brief calls several replicas, sharing one event loop and one GIL;
- N worker processes (`bench.worker_process`), each a Worker on its own Runtime: replicas as
  they are deployed.

No job may run twice: the sandbox's call log must hold exactly one GET /plan (and one
GET /plan/list) per job, and every job must be done on its first attempt.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field

import asyncpg
import httpx
from sqlalchemy.engine import make_url

from app.accounts import service as accounts
from app.accounts.schemas import AccountCreate
from app.blocked_runs.service import open_blocked_run
from app.runtime import Runtime
from app.settings import Settings
from app.worker import Worker
from bench import procstat
from bench.env import Child, Tenant, child_environment, spawn
from bench.report import Row, ratio, table

DRAIN_TIMEOUT = 60.0
READY_TIMEOUT = 30.0
POLL = 0.02
BATCH = 100


@dataclass
class WorkerConfig:
    jobs: int = 1000
    organizations: int = 8
    many: int = 4
    processes: bool = True
    # Each arrangement drains jobs/repeats jobs this many times, arrangements taking turns, so
    # a change in the machine's background load lands on all of them.
    repeats: int = 2


@dataclass
class Round:
    label: str
    workers: int
    jobs: int
    seconds: float = 0.0
    worker_cpu: float = 0.0
    sandbox_cpu: float = 0.0
    postgres_cpu: float = 0.0
    plan_calls: int = 0
    list_calls: int = 0
    attempts: Counter[int] = field(default_factory=Counter)
    states: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    claimers: int = 0

    @property
    def rate(self) -> float:
        return self.jobs / self.seconds if self.seconds else 0.0

    def merge(self, other: Round) -> None:
        self.jobs += other.jobs
        self.seconds += other.seconds
        self.worker_cpu += other.worker_cpu
        self.sandbox_cpu += other.sandbox_cpu
        self.postgres_cpu += other.postgres_cpu
        self.plan_calls += other.plan_calls
        self.list_calls += other.list_calls
        self.attempts += other.attempts
        self.states += other.states
        self.statuses += other.statuses
        self.claimers = max(self.claimers, other.claimers)


async def _make_tenant(rt: Runtime, sandbox: httpx.AsyncClient) -> Tenant:
    """A free sandbox organization and its account, stored through the service's own code."""
    secret = "whsec_" + uuid.uuid4().hex
    spec = {"plan_id": None, "balance": 0, "checkout": True, "webhook_secret": secret}
    org = (await sandbox.post("/_sandbox/orgs", json=spec)).raise_for_status().json()
    body = AccountCreate.model_validate(
        {"name": "Bench Org", "mosaic_api_key": org["api_key"], "webhook_secret": secret}
    )
    async with rt.db.transaction() as session:
        account = await accounts.create(session, rt.keyring, body, rt.settings.public_url)
    return Tenant(
        account_id=str(account.id),
        webhook_path=httpx.URL(account.webhook_url).path,
        webhook_secret=secret,
        mosaic_key=org["api_key"],
        organization_id=org["organization_id"],
    )


async def _open_runs(rt: Runtime, tenants: list[Tenant], jobs: int) -> None:
    for start in range(0, jobs, BATCH):
        async with rt.db.transaction() as session:
            for i in range(start, min(start + BATCH, jobs)):
                tenant = tenants[i % len(tenants)]
                opened = await open_blocked_run(
                    rt,
                    session,
                    account_id=uuid.UUID(tenant.account_id),
                    run_id=f"bench-run-{uuid.uuid4().hex}",
                    agent_id="bench-agent",
                    actor="bench",
                    reason="benchmark: blocked run opened directly",
                )
                if opened is None:
                    raise RuntimeError("a fresh run_id already had an open episode")


# A way of running workers: entered once the jobs are recorded, it starts them all at once and
# yields (a probe that raises if a worker died, the pids of worker processes, if any).
Started = tuple[Callable[[], None], list[int]]
StartWorkers = Callable[[], AbstractAsyncContextManager[Started]]


def in_process(settings: Settings, database_url: str, count: int) -> StartWorkers:
    @asynccontextmanager
    async def workers() -> AsyncIterator[Started]:
        runtimes = [await Runtime.start(settings, database_url) for _ in range(count)]
        stop = asyncio.Event()
        tasks: list[asyncio.Task[None]] = []

        def check() -> None:
            for task in tasks:
                if task.done():
                    task.result()  # a crashed worker ends the benchmark with its error
                    raise RuntimeError("a worker stopped on its own")

        try:
            tasks = [asyncio.create_task(Worker(rt).run(stop)) for rt in runtimes]
            yield check, []
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            for rt in runtimes:
                await rt.close()

    return workers


def in_processes(database_url: str, mosaic_url: str, count: int) -> StartWorkers:
    @asynccontextmanager
    async def workers() -> AsyncIterator[Started]:
        env = child_environment(database_url, mosaic_url)
        procs = [
            Child("worker", "", spawn(["-m", "bench.worker_process"], env, pipes=True))
            for _ in range(count)
        ]
        try:
            for proc in procs:
                assert proc.process.stdout is not None
                line = await asyncio.wait_for(
                    asyncio.to_thread(proc.process.stdout.readline), READY_TIMEOUT
                )
                if line.strip() != b"ready":
                    raise RuntimeError(f"worker process {proc.pid} did not get ready")

            def check() -> None:
                for proc in procs:
                    if proc.process.poll() is not None:
                        raise RuntimeError(f"worker process {proc.pid} exited")

            for proc in procs:
                assert proc.process.stdin is not None
                proc.process.stdin.write(b"go\n")
                proc.process.stdin.flush()
            yield check, [proc.pid for proc in procs]
        finally:
            for proc in procs:
                proc.stop()

    return workers


async def _pending(conn: asyncpg.Connection, accounts: list[uuid.UUID]) -> bool:
    # Cheap on purpose (the partial index on pending jobs): it runs every POLL seconds and its
    # Postgres CPU counts against the round.
    pending: bool = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM jobs WHERE status = 'pending' AND account_id = ANY($1))",
        accounts,
    )
    return pending


async def _round(
    setup: Runtime,
    database_url: str,
    sandbox: httpx.AsyncClient,
    sandbox_pid: int,
    config: WorkerConfig,
    jobs: int,
    label: str,
    count: int,
    workers: StartWorkers,
) -> Round:
    result = Round(label=label, workers=count, jobs=jobs)
    tenants = [await _make_tenant(setup, sandbox) for _ in range(jobs)]
    accounts = [uuid.UUID(t.account_id) for t in tenants]
    await _open_runs(setup, tenants, jobs)
    (await sandbox.delete("/_sandbox/calls")).raise_for_status()
    conn = await asyncpg.connect(database_url)
    try:
        async with workers() as (check, pids):
            cpu_before = sum(procstat.cpu_seconds(pid) for pid in pids)
            with procstat.cpu(sandbox_pid, make_url(database_url).database or "") as used:
                started = time.perf_counter()
                deadline = started + DRAIN_TIMEOUT
                while await _pending(conn, accounts):
                    if time.perf_counter() > deadline:
                        raise RuntimeError(f"{label}: jobs not drained in {DRAIN_TIMEOUT}s")
                    check()
                    await asyncio.sleep(POLL)
                result.seconds = time.perf_counter() - started
            cpu_after = sum(procstat.cpu_seconds(pid) for pid in pids)
        # With worker processes this process only polled; otherwise it ran the workers.
        result.worker_cpu = (cpu_after - cpu_before) if pids else used.own
        result.sandbox_cpu = used.other
        result.postgres_cpu = used.postgres

        rows = await conn.fetch(
            "SELECT status, attempts, locked_by FROM jobs WHERE account_id = ANY($1)", accounts
        )
        states = await conn.fetch(
            "SELECT state, count(*) AS n FROM blocked_runs WHERE account_id = ANY($1)"
            " GROUP BY state",
            accounts,
        )
    finally:
        await conn.close()
    calls = (await sandbox.get("/_sandbox/calls", params={"method": "GET"})).json()
    keys = {t.mosaic_key for t in tenants}
    paths = Counter(c["path"] for c in calls if c["api_key"] in keys)
    result.plan_calls = paths["/plan"]
    result.list_calls = paths["/plan/list"]
    result.attempts = Counter(r["attempts"] for r in rows)
    result.states = Counter({r["state"]: r["n"] for r in states})
    result.statuses = Counter(r["status"] for r in rows)
    result.claimers = len({r["locked_by"] for r in rows})
    return result


def _check(r: Round) -> list[str]:
    problems = []
    if r.plan_calls != r.jobs:
        problems.append(f"{r.label}: {r.plan_calls} GET /plan calls for {r.jobs} jobs")
    if r.list_calls != r.jobs:
        problems.append(f"{r.label}: {r.list_calls} GET /plan/list calls for {r.jobs} jobs")
    if r.statuses != Counter({"done": r.jobs}):
        problems.append(f"{r.label}: job statuses {dict(r.statuses)}")
    if r.attempts != Counter({1: r.jobs}):
        problems.append(f"{r.label}: attempts per job {dict(r.attempts)}")
    if r.states != Counter({"awaiting_choice": r.jobs}):
        problems.append(f"{r.label}: run states {dict(r.states)}")
    if r.claimers > r.workers:
        problems.append(f"{r.label}: {r.claimers} workers claimed jobs, {r.workers} ran")
    return problems


def _rows(base: Round, other: Round) -> list[Row]:
    def per_job(seconds: float, jobs: int) -> str:
        return f"{seconds / jobs * 1000:.2f}"

    return [
        Row(
            f"{other.label}: drain time (s)",
            f"{base.seconds:.2f}",
            f"{other.seconds:.2f}",
            ratio(base.seconds, other.seconds) + " speed-up",
        ),
        Row("  jobs/s", f"{base.rate:,.0f}", f"{other.rate:,.0f}", ratio(other.rate, base.rate)),
        Row(
            "  worker CPU per job (ms)",
            per_job(base.worker_cpu, base.jobs),
            per_job(other.worker_cpu, other.jobs),
            ratio(other.worker_cpu / other.jobs, base.worker_cpu / base.jobs),
        ),
        Row(
            "  sandbox CPU per job (ms)",
            per_job(base.sandbox_cpu, base.jobs),
            per_job(other.sandbox_cpu, other.jobs),
            ratio(other.sandbox_cpu / other.jobs, base.sandbox_cpu / base.jobs),
        ),
        Row(
            "  Postgres CPU per job (ms)",
            per_job(base.postgres_cpu, base.jobs),
            per_job(other.postgres_cpu, other.jobs),
            ratio(other.postgres_cpu / other.jobs, base.postgres_cpu / base.jobs),
        ),
        Row(
            "  CPU busy, all three (cores)",
            f"{(base.worker_cpu + base.sandbox_cpu + base.postgres_cpu) / base.seconds:.2f}",
            f"{(other.worker_cpu + other.sandbox_cpu + other.postgres_cpu) / other.seconds:.2f}",
            "",
        ),
        Row(
            "  GET /plan calls (= jobs?)",
            f"{base.plan_calls} / {base.jobs}",
            f"{other.plan_calls} / {other.jobs}",
            "",
        ),
        Row("  workers that claimed jobs", str(base.claimers), str(other.claimers), ""),
    ]


@dataclass
class WorkerOutcome:
    ok: bool
    text: str
    problems: list[str]
    baseline: Round  # one Worker in this process: what the step goal is measured on


async def run(
    settings: Settings,
    database_url: str,
    sandbox: httpx.AsyncClient,
    sandbox_proc: Child,
    config: WorkerConfig,
) -> WorkerOutcome:
    n = config.many
    arrangements: list[tuple[str, int, StartWorkers]] = [
        ("1 worker", 1, in_process(settings, database_url, 1)),
        (f"{n} Workers, 1 process", n, in_process(settings, database_url, n)),
    ]
    if config.processes:
        mosaic = sandbox_proc.url
        arrangements.append((f"{n} worker processes", n, in_processes(database_url, mosaic, n)))
    repeats = max(1, min(config.repeats, config.jobs))
    totals = {label: Round(label=label, workers=count, jobs=0) for label, count, _ in arrangements}
    problems: list[str] = []
    setup = await Runtime.start(settings, database_url)
    try:
        for turn in range(repeats):
            jobs = config.jobs // repeats + (1 if turn < config.jobs % repeats else 0)
            for label, count, workers in arrangements:
                one = await _round(
                    setup,
                    database_url,
                    sandbox,
                    sandbox_proc.pid,
                    config,
                    jobs,
                    label,
                    count,
                    workers,
                )
                problems += _check(one)
                totals[label].merge(one)
    finally:
        await setup.close()
    rounds = list(totals.values())

    base, *others = rounds
    rows = [row for other in others for row in _rows(base, other)]
    text = table(
        f"2. Worker throughput: drain {config.jobs} check_plan jobs (free orgs: GET /plan + "
        f"GET /plan/list each) per arrangement, in {repeats} alternating turns, "
        f"one organization per job, worker_concurrency "
        f"{settings.worker_concurrency} per worker, sandbox without faults",
        rows,
        baseline="1 worker",
        measured=f"{n} workers",
    )
    verdict = (
        "  check: every job done on its first attempt, one GET /plan and one GET /plan/list "
        "per job, every run in awaiting_choice: " + ("OK" if not problems else "FAILED")
    )
    lines = [text, verdict, *(f"  problem: {p}" for p in problems)]
    return WorkerOutcome(ok=not problems, text="\n".join(lines), problems=problems, baseline=base)
