"""Benchmarks 1 and 3: webhook ingest against /healthz, in throughput, latency and memory.

The service runs in its own process with its worker off, so only ingest is measured: verify the
signature, store the event once, open the blocked run and record its first job. The baseline is
the same number of GET /healthz on the same server, over the same connections, at the same
concurrency, measured in the same run.
"""

from __future__ import annotations

import json
import random
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
from sqlalchemy.engine import make_url

from app.auth import mint_token
from bench import loadgen, procstat
from bench.env import JWT_SECRET, Child, Tenant, bearer, make_tenant
from bench.report import Row, ratio, table


@dataclass
class IngestConfig:
    webhooks: int = 2000
    exact_duplicate_share: float = 0.20  # byte-identical redeliveries
    rewritten_duplicate_share: float = 0.05  # same run, different bytes (episode dedup)
    concurrency: int = 32
    warmup: int = 300
    slices: int = 4  # baseline and measured traffic alternate in this many slices each
    seed: int = 7


@dataclass
class Plan:
    """The webhook bodies to send, shuffled, and what the service must end up with."""

    bodies: list[bytes]
    distinct_runs: set[str]
    distinct_bodies: int
    expected: Counter[str] = field(default_factory=Counter)


def finished_payload(run_id: str, agent_id: str, *, message: str) -> dict[str, Any]:
    """A RUN_FINISHED with needs_credits, shaped like Mosaic's (and the sandbox's)."""
    return {
        "flag": "RUN_FINISHED",
        "agent_id": agent_id,
        "run_id": run_id,
        "status": "failed",
        "status_message": message,
        "node_status_counts": {"completed": 2, "failed": 1, "pending": 1},
        "needs_credits": True,
        "errors": [{"node_id": "n3", "message": "Insufficient credits", "needs_credits": True}],
        "inputs": {"video_urls": ["https://example.com/in.mp4"]},
        "outputs": [],
        "triggered_by": None,
    }


def plan_webhooks(config: IngestConfig, rng: random.Random) -> Plan:
    total = config.webhooks
    exact = round(total * config.exact_duplicate_share)
    rewritten = round(total * config.rewritten_duplicate_share)
    distinct = total - exact - rewritten
    if distinct < 1:
        raise SystemExit("duplicate shares leave no distinct runs")
    originals: list[tuple[str, bytes]] = []
    for i in range(distinct):
        run_id = str(uuid.UUID(int=rng.getrandbits(128)))
        payload = finished_payload(run_id, f"agent-{i % 17}", message="Insufficient credits")
        originals.append((run_id, json.dumps(payload).encode()))
    bodies = [body for _, body in originals]
    bodies += [rng.choice(originals)[1] for _ in range(exact)]
    for copy in range(rewritten):
        run_id, _ = rng.choice(originals)
        payload = finished_payload(run_id, "agent-x", message=f"Insufficient credits ({copy})")
        bodies.append(json.dumps(payload).encode())
    rng.shuffle(bodies)
    plan = Plan(
        bodies=bodies,
        distinct_runs={run_id for run_id, _ in originals},
        distinct_bodies=len(set(bodies)),
    )
    # An exact copy is recognised by the inbox; a rewritten one by the open episode.
    plan.expected["accepted"] = distinct
    plan.expected["duplicate"] = total - distinct
    return plan


def webhook_requests(port: int, tenant: Tenant, bodies: list[bytes]) -> list[bytes]:
    headers = {"Content-Type": "application/json", "X-Mosaic-Signature": tenant.webhook_secret}
    return [loadgen.request_bytes("POST", tenant.webhook_path, port, b, headers) for b in bodies]


def health_requests(port: int, count: int) -> list[bytes]:
    return [loadgen.request_bytes("GET", "/healthz", port)] * count


@dataclass
class IngestOutcome:
    ok: bool
    text: str  # benchmark 1
    memory_text: str  # benchmark 3
    problems: list[str]


API_PAGES = 100


async def _runs_via_api(api: httpx.AsyncClient, tenant: Tenant) -> Counter[str]:
    """run_id -> blocked runs, as the account itself sees them through GET /v1/blocked-runs."""
    token = mint_token(
        JWT_SECRET, sub="bench-reader", scopes=["runs:read"], account_id=tenant.account_id
    )
    found: Counter[str] = Counter()
    cursor = None
    for _ in range(API_PAGES):
        params = {"limit": "200", **({"cursor": cursor} if cursor else {})}
        page = await api.get("/v1/blocked-runs", params=params, headers=bearer(token))
        page.raise_for_status()
        body = page.json()
        found.update(item["run_id"] for item in body["items"])
        cursor = body.get("next_cursor")
        if not cursor:
            return found
    raise RuntimeError(f"more than {API_PAGES} pages of blocked runs")


async def _verify(database_url: str, tenant: Tenant, plan: Plan, seen: Counter[str]) -> list[str]:
    problems: list[str] = []
    if seen != plan.expected:
        problems.append(f"answers {dict(seen)} != expected {dict(plan.expected)}")
    conn = await asyncpg.connect(database_url)
    try:
        account = uuid.UUID(tenant.account_id)
        rows = await conn.fetch(
            "SELECT run_id, count(*) AS n, min(state) AS state FROM blocked_runs"
            " WHERE account_id = $1 GROUP BY run_id",
            account,
        )
        per_run = {r["run_id"]: r["n"] for r in rows}
        if set(per_run) != plan.distinct_runs:
            missing = len(plan.distinct_runs - set(per_run))
            extra = len(set(per_run) - plan.distinct_runs)
            problems.append(f"blocked runs: {missing} run_ids missing, {extra} unexpected")
        doubled = sum(1 for n in per_run.values() if n != 1)
        if doubled:
            problems.append(f"{doubled} run_ids have more than one blocked run")
        if any(r["state"] != "checking_plan" for r in rows):
            problems.append("a blocked run left checking_plan although no worker ran")
        jobs = await conn.fetchval(
            "SELECT count(*) FROM jobs WHERE account_id = $1 AND kind = 'check_plan'"
            " AND status = 'pending'",
            account,
        )
        # The plan is the organization's question: one check for all of its runs.
        if jobs != (1 if plan.distinct_runs else 0):
            problems.append(f"{jobs} check_plan jobs, expected one for the organization")
        events = await conn.fetchval(
            "SELECT count(*) FROM webhook_events WHERE account_id = $1", account
        )
        if events != plan.distinct_bodies:
            problems.append(f"{events} stored events, expected {plan.distinct_bodies}")
    finally:
        await conn.close()
    return problems


@dataclass
class Phase:
    """One kind of traffic, summed over its interleaved slices."""

    result: loadgen.Result = field(default_factory=loadgen.Result)
    cpu: procstat.Cpu = field(default_factory=procstat.Cpu)
    memory: list[procstat.Usage] = field(default_factory=list)

    async def play(
        self, pid: int, database: str, port: int, requests: list[bytes], config: IngestConfig
    ) -> None:
        with procstat.cpu(pid, database) as used:
            async with procstat.watch(pid) as usage:
                part = await loadgen.run(
                    port, requests, concurrency=config.concurrency, keep_bodies=True
                )
        self.result.merge(part)
        self.cpu.add(used)
        self.memory.append(usage)

    @property
    def peak_kib(self) -> int:
        return max(u.peak_kib for u in self.memory)

    @property
    def growth_kib(self) -> int:
        """The largest rise of the peak above a slice's starting RSS."""
        return max(u.growth_kib for u in self.memory)

    @property
    def retained_kib(self) -> int:
        """RSS still held after the slices, summed over them (what a leak would show as)."""
        return sum(u.after_kib - u.before_kib for u in self.memory)


def _slices(requests: list[bytes], count: int) -> list[list[bytes]]:
    size = -(-len(requests) // count)
    return [requests[i : i + size] for i in range(0, len(requests), size)]


async def run(
    database_url: str,
    service: Child,
    sandbox: httpx.AsyncClient,
    api: httpx.AsyncClient,
    config: IngestConfig,
) -> IngestOutcome:
    port = httpx.URL(service.url).port
    assert port is not None
    rng = random.Random(config.seed)
    warm_tenant = await make_tenant(api, sandbox)
    tenant = await make_tenant(api, sandbox)
    plan = plan_webhooks(config, rng)
    n = len(plan.bodies)

    # Warm both paths (imports, pools, statement caches) before anything is measured.
    warm = plan_webhooks(IngestConfig(webhooks=config.warmup, seed=config.seed + 1), rng)
    await loadgen.run(port, health_requests(port, config.warmup), concurrency=config.concurrency)
    await loadgen.run(
        port, webhook_requests(port, warm_tenant, warm.bodies), concurrency=config.concurrency
    )

    # Interleaved slices: a change in background load on the machine lands on both sides.
    baseline, measured = Phase(), Phase()
    database = make_url(database_url).database or ""
    hook_slices = _slices(webhook_requests(port, tenant, plan.bodies), config.slices)
    health_slices = _slices(health_requests(port, n), config.slices)
    for health_slice, hook_slice in zip(health_slices, hook_slices, strict=True):
        await baseline.play(service.pid, database, port, health_slice, config)
        await measured.play(service.pid, database, port, hook_slice, config)

    problems: list[str] = []
    if bad := [s for s in baseline.result.statuses if s != 200]:
        problems.append(f"/healthz answered {Counter(bad)}")
    if bad := [s for s in measured.result.statuses if s != 202]:
        problems.append(f"webhooks answered {Counter(bad)}")
    seen = Counter(json.loads(body).get("status", "?") for body in measured.result.bodies)
    problems += await _verify(database_url, tenant, plan, seen)
    listed = await _runs_via_api(api, tenant)
    if set(listed) != plan.distinct_runs or any(n != 1 for n in listed.values()):
        problems.append(
            f"the API lists {sum(listed.values())} blocked runs for {len(listed)} run_ids, "
            f"expected one for each of {len(plan.distinct_runs)}"
        )

    base, hook = baseline.result, measured.result
    rewritten = plan.expected["duplicate"] - (n - plan.distinct_bodies)
    ingest = table(
        f"1. Webhook ingest: {n} signed RUN_FINISHED (needs_credits) webhooks, "
        f"{len(plan.distinct_runs)} distinct runs, {n - len(plan.distinct_runs)} duplicates "
        f"({rewritten} of them rewritten), concurrency {config.concurrency}, worker off, "
        f"{config.slices} interleaved slices",
        [
            Row(
                "throughput (req/s)",
                f"{base.throughput:,.0f}",
                f"{hook.throughput:,.0f}",
                ratio(hook.throughput, base.throughput),
            ),
            *(
                Row(
                    f"latency p{round(q * 100)} (ms)",
                    f"{base.percentile(q) * 1000:.2f}",
                    f"{hook.percentile(q) * 1000:.2f}",
                    ratio(hook.percentile(q), base.percentile(q)),
                )
                for q in (0.50, 0.99)
            ),
            _per_request("service CPU per request (ms)", baseline.cpu.other, measured.cpu.other, n),
            _per_request(
                "Postgres CPU per request (ms)", baseline.cpu.postgres, measured.cpu.postgres, n
            ),
            _per_request("load generator CPU per req (ms)", baseline.cpu.own, measured.cpu.own, n),
            Row(
                "service CPU busy (% of one core)",
                f"{100 * baseline.cpu.other / base.wall:.0f}%",
                f"{100 * measured.cpu.other / hook.wall:.0f}%",
                "",
            ),
            Row("wall time (s)", f"{base.wall:.2f}", f"{hook.wall:.2f}", ""),
        ],
        baseline=f"GET /healthz x{n}",
        measured=f"POST webhook x{n}",
    )
    verdict = (
        f"  check: {plan.expected['accepted']} accepted, {plan.expected['duplicate']} duplicate, "
        f"one blocked run (in the database and through the API) per distinct run_id, one "
        f"check_plan job for the organization, "
        f"{plan.distinct_bodies} stored events: " + ("OK" if not problems else "FAILED")
    )
    mib = 1024.0
    floored = baseline.growth_kib < GROWTH_FLOOR_KIB or baseline.retained_kib < GROWTH_FLOOR_KIB
    mem = table(
        f"3. Memory: service process RSS while serving the requests of benchmark 1 "
        f"(after {config.warmup} warm-up requests of each kind; {measured.memory[0].method})",
        [
            Row(
                "RSS at start (MiB)",
                f"{baseline.memory[0].before_kib / mib:.1f}",
                f"{measured.memory[0].before_kib / mib:.1f}",
                "",
            ),
            Row(
                "peak RSS (MiB)",
                f"{baseline.peak_kib / mib:.1f}",
                f"{measured.peak_kib / mib:.1f}",
                ratio(measured.peak_kib, baseline.peak_kib),
            ),
            Row(
                "peak growth within a slice (MiB)",
                f"{baseline.growth_kib / mib:.2f}",
                f"{measured.growth_kib / mib:.2f}",
                _growth_ratio(measured.growth_kib, baseline.growth_kib),
            ),
            Row(
                "RSS retained, all slices (MiB)",
                f"{baseline.retained_kib / mib:.2f}",
                f"{measured.retained_kib / mib:.2f}",
                _growth_ratio(measured.retained_kib, baseline.retained_kib),
            ),
        ],
        baseline="/healthz",
        measured="webhooks",
    )
    lines = [ingest, verdict, *(f"  problem: {p}" for p in problems)]
    memory_lines = [mem]
    if floored:
        memory_lines.append(
            f"  * the baseline grew by less than {GROWTH_FLOOR_KIB // 1024} MiB: "
            "that ratio is taken against 1 MiB instead of against ~0"
        )
    return IngestOutcome(
        ok=not problems,
        text="\n".join(lines),
        memory_text="\n".join(memory_lines),
        problems=problems,
    )


def _per_request(what: str, baseline: float, measured: float, count: int) -> Row:
    return Row(
        what,
        f"{baseline / count * 1000:.3f}",
        f"{measured / count * 1000:.3f}",
        ratio(measured, baseline),
    )


GROWTH_FLOOR_KIB = 1024


def _growth_ratio(measured_kib: int, baseline_kib: int) -> str:
    # After warm-up /healthz grows by a few pages at most; a ratio over ~0 would say nothing.
    if baseline_kib < GROWTH_FLOOR_KIB:
        return f"{max(0, measured_kib) / GROWTH_FLOOR_KIB:.2f}x*"
    return ratio(measured_kib, baseline_kib)
