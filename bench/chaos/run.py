"""`python -m bench.chaos` (`make chaos`): one chaos run, its figures, then the invariants.

Exits 0 only when every invariant holds. Short by default (a few minutes on 2 cores); the
release-check run is `CHAOS_FLOWS=1000` (see docs/chaos.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from sqlalchemy.engine import make_url

from app import migrations
from bench.chaos.cluster import Cluster
from bench.chaos.flows import ACTIVE, Kind, Load, plan_orgs
from bench.chaos.gateway import Gateway
from bench.chaos.invariants import Check, Observed, check_all, dump, observe_database
from bench.chaos.postgres import PrivatePostgres
from bench.chaos.relay import WebhookRelay
from bench.env import ENCRYPTION_KEY, JWT_SECRET, LOOPBACK, Child, free_port, spawn

# Calls answered 5xx this soon after PostgreSQL is back still count as part of the outage:
# pooled connections broken by the restart are found out on their next use.
OUTAGE_GRACE = 5.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__)
    parser.add_argument(
        "--flows",
        type=int,
        default=int(env("CHAOS_FLOWS", "60")),
        help="blocked runs in all (CHAOS_FLOWS, 60)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=int(env("CHAOS_SEED", "1")),
        help="seed of every random choice (CHAOS_SEED, 1)",
    )
    parser.add_argument(
        "--api", type=int, default=int(env("CHAOS_API", "2")), help="API replicas (CHAOS_API, 2)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=int(env("CHAOS_WORKERS", "2")),
        help="worker replicas (CHAOS_WORKERS, 2)",
    )
    parser.add_argument(
        "--load-seconds",
        type=float,
        default=None,
        help="window over which organizations arrive (default: flows/1.5, ≥30)",
    )
    parser.add_argument(
        "--kill-every",
        type=float,
        nargs=2,
        default=(2.0, 5.0),
        metavar=("MIN", "MAX"),
        help="seconds between SIGKILLs (2 5)",
    )
    parser.add_argument(
        "--mosaic-fault-rate",
        type=float,
        default=0.3,
        help="share of Mosaic calls failed during the fault window (0.3)",
    )
    parser.add_argument(
        "--pg-down",
        type=float,
        default=3.0,
        help="seconds PostgreSQL stays down in its restart (3)",
    )
    parser.add_argument(
        "--converge-timeout",
        type=float,
        default=180.0,
        help="seconds allowed to settle after the faults stop (180)",
    )
    parser.add_argument(
        "--admin-url",
        default=env("CHAOS_ADMIN_URL"),
        help="use this PostgreSQL server instead of a private one (no restart)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the logs directory")
    return parser.parse_args(argv)  # fmt: skip


@dataclass
class Figures:
    started: float = field(default_factory=time.monotonic)
    outages: list[tuple[float, float]] = field(default_factory=list)
    mosaic_window: tuple[float, float] = (0.0, 0.0)
    faults_stopped: float = 0.0
    converged: float | None = None


async def _database(admin_url: str, name: str) -> str:
    admin = make_url(admin_url)
    conn = await asyncpg.connect(str(admin.set(drivername="postgresql")))
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return admin.set(database=name).render_as_string(hide_password=False)


async def _drop(admin_url: str, name: str) -> None:
    conn = await asyncpg.connect(str(make_url(admin_url).set(drivername="postgresql")))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def _child_env(database_url: str, mosaic_url: str) -> dict[str, str]:
    return {
        "DATABASE_URL": database_url,
        "MOSAIC_BASE_URL": mosaic_url,
        "UNBLOCK_ENV": "test",
        "UNBLOCK_JWT_SECRET": JWT_SECRET,
        "UNBLOCK_ENCRYPTION_KEY": ENCRYPTION_KEY,
        "UNBLOCK_RETRY_BASE": "100ms",
        "UNBLOCK_RETRY_MAX": "2s",
        "UNBLOCK_JOB_LEASE": "6s",
        "UNBLOCK_POLL_INTERVAL": "500ms",
        "UNBLOCK_ACTION_DEADLINE": "2s",
        "UNBLOCK_MOSAIC_TIMEOUT": "2s",
        "UNBLOCK_MOSAIC_CONNECT_TIMEOUT": "1s",
        "UNBLOCK_GIVE_UP_AFTER": "15m",
        "UNBLOCK_LOG_LEVEL": "WARNING",
    }


async def _start_sandbox(seed: int, log_dir: Path) -> Child:
    port = free_port()
    log = (log_dir / "sandbox.log").open("ab")
    process = spawn(
        ["-m", "mosaic_sandbox", "--host", LOOPBACK, "--port", str(port), "--seed", str(seed),
         "--step-delay", "0.05", "--webhook-retry-base", "0.1", "--webhook-max-attempts", "12",
         "--log-level", "warning"],
    )  # fmt: skip
    log.close()
    child = Child("sandbox", f"http://{LOOPBACK}:{port}", process)
    async with httpx.AsyncClient(base_url=child.url, timeout=2) as http:
        for _ in range(300):
            try:
                if (await http.get("/_sandbox/faults")).status_code == 200:
                    return child
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)
    child.stop()
    raise RuntimeError("sandbox did not start")


def _mosaic_faults(rate: float) -> list[dict[str, Any]]:
    """About `rate` of calls fail (5xx, 429, hangs past the 2s client timeout); a POST that
    buys, writes settings or resumes loses its answer as often, after Mosaic applied it."""
    share = 1 - (1 - rate) ** (1 / 3)  # three independent faults add up to `rate`
    return [
        {"method": "POST", "path": "/plan/upgrade", "action": "status", "status": 502,
         "lost_answer": True, "rate": rate / 2},
        {"method": "POST", "path": "/plan/upgrade", "action": "hang", "latency_ms": 4000,
         "lost_answer": True, "rate": rate / 2},
        {"method": "POST", "path": "/credits/settings", "action": "drop", "lost_answer": True,
         "rate": rate / 2},
        {"method": "POST", "path": "/credits/settings", "action": "status", "status": 504,
         "lost_answer": True, "rate": rate / 2},
        {"method": "POST", "path": "/agent_run/*/resume", "action": "hang", "latency_ms": 4000,
         "lost_answer": True, "rate": rate / 2},
        {"path": "*", "action": "status", "status": 503, "rate": share},
        {"path": "*", "action": "rate_limit", "retry_after": 0.5, "rate": share},
        {"path": "*", "action": "hang", "latency_ms": 4000, "rate": share},
    ]  # fmt: skip


async def _control(sandbox: httpx.AsyncClient, method: str, path: str, **kwargs: Any) -> None:
    """A control call the run depends on, retried while an overloaded sandbox does not answer."""
    for attempt in range(10):
        try:
            (await sandbox.request(method, path, **kwargs)).raise_for_status()
            return
        except httpx.TransportError:
            if attempt == 9:
                raise
            await asyncio.sleep(1)


async def _chaos(
    args: argparse.Namespace,
    figures: Figures,
    cluster: Cluster,
    sandbox: httpx.AsyncClient,
    postgres: PrivatePostgres | None,
    load_seconds: float,
    stop: asyncio.Event,
) -> None:
    """Mosaic's fault window, one PostgreSQL restart, and replica kills until `stop`."""
    begin = time.monotonic()
    killer = asyncio.create_task(cluster.killer(stop, tuple(args.kill_every)))

    async def at(fraction: float) -> None:
        await asyncio.sleep(max(0.0, begin + fraction * load_seconds - time.monotonic()))

    await at(0.15)
    for spec in _mosaic_faults(args.mosaic_fault_rate):
        await _control(sandbox, "POST", "/_sandbox/faults", json=spec)
    window_start = time.monotonic() - begin
    await at(0.4)
    if postgres is not None:
        down = time.monotonic()
        await postgres.outage(args.pg_down)
        figures.outages.append((down, time.monotonic() + OUTAGE_GRACE))
    await at(0.7)
    await _control(sandbox, "DELETE", "/_sandbox/faults")
    figures.mosaic_window = (window_start, time.monotonic() - begin)
    await stop.wait()
    await killer


async def _settled(database_url: str) -> bool:
    conn = await asyncpg.connect(database_url)
    try:
        active = await conn.fetchval(
            "SELECT count(*) FROM blocked_runs WHERE state = ANY($1::text[])", list(ACTIVE)
        )
        pending = await conn.fetchval("SELECT count(*) FROM jobs WHERE status = 'pending'")
    finally:
        await conn.close()
    return active == 0 and pending == 0


async def run(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    load_seconds = args.load_seconds or max(30.0, args.flows / 1.5)
    root = Path(tempfile.mkdtemp(prefix=f"unblock-chaos-{args.seed}-"))
    os.chmod(root, 0o755)
    log_dir = root / "logs"
    log_dir.mkdir()
    postgres: PrivatePostgres | None = None
    if args.admin_url:
        admin_url = args.admin_url
    else:
        (root / "pg").mkdir()
        postgres = PrivatePostgres(root / "pg")
        await asyncio.to_thread(postgres.start)
        admin_url = postgres.admin_url
    name = f"unblock_chaos_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    database_url = await _database(admin_url, name)
    await asyncio.to_thread(migrations.upgrade, database_url)
    figures = Figures()
    sandbox_child = await _start_sandbox(args.seed, log_dir)
    cluster = Cluster(
        api=args.api,
        workers=args.workers,
        env=_child_env(database_url, sandbox_child.url),
        log_dir=log_dir,
        rng=random.Random(rng.random()),
    )
    ok = False
    try:
        # No keep-alive to the sandbox: a pooled connection the server closes as it is reused
        # fails a control call (a run started twice if retried), and these calls are few.
        limits = httpx.Limits(max_keepalive_connections=0)
        async with httpx.AsyncClient(
            base_url=sandbox_child.url, timeout=30, limits=limits
        ) as sandbox:
            await cluster.start()
            gateway = Gateway(cluster, random.Random(rng.random()))
            deadline = time.monotonic() + load_seconds + args.converge_timeout + 120
            load: Load
            relay = WebhookRelay(
                gateway,
                random.Random(rng.random()),
                before_delivery=lambda account, event: load.before_delivery(account, event),
                deadline=deadline,
            )
            await relay.start()
            load = Load(gateway, sandbox, rng, relay_url=relay.url, deadline=deadline)
            orgs = plan_orgs(args.flows, rng)
            print(
                f"chaos: {args.flows} flows in {len(orgs)} organizations over {load_seconds:.0f}s;"
                f" {args.api} API + {args.workers} worker replicas; seed {args.seed};"
                f" logs in {log_dir}",
                flush=True,
            )
            stop = asyncio.Event()
            chaos = asyncio.create_task(
                _chaos(args, figures, cluster, sandbox, postgres, load_seconds, stop)
            )
            people = [
                asyncio.create_task(load.drive(org, rng.uniform(0, load_seconds))) for org in orgs
            ]
            await asyncio.gather(*people)
            stop.set()
            await chaos
            figures.faults_stopped = time.monotonic()
            await relay.drain()
            converge_deadline = time.monotonic() + args.converge_timeout
            while time.monotonic() < converge_deadline:
                if await _settled(database_url):
                    figures.converged = time.monotonic()
                    break
                await asyncio.sleep(0.5)  # polling the database: nothing to await on here
            seen = Observed(
                orgs=orgs,
                sandbox_orgs={
                    o["organization_id"]: o
                    for o in (await sandbox.get("/_sandbox/orgs")).raise_for_status().json()
                },
                calls=(await sandbox.get("/_sandbox/calls")).raise_for_status().json(),
                episodes=[],
                history={},
                pending_jobs=0,
                server_errors=gateway.traffic.server_errors,
                outages=figures.outages,
                lost_webhooks=relay.lost,
            )
            seen.episodes, seen.history, seen.pending_jobs = await observe_database(database_url)
            deliveries = (await sandbox.get("/_sandbox/webhooks")).raise_for_status().json()
            undelivered = sum(1 for d in deliveries if not d["delivered"] and not d["pending"])
            checks = check_all(seen)
            _report(args, figures, orgs, cluster, gateway, relay, load, seen, checks, undelivered)
            ok = all(check.passed for check in checks)
            if not ok:
                dump_path = log_dir / "observed.json"
                dump_path.write_text(json.dumps(dump(seen), indent=1, default=str))
            await relay.stop()
            await gateway.aclose()
    finally:
        # Each step on its own: one failing must not leave the others' processes running.
        with contextlib.suppress(Exception):
            await cluster.stop()
        sandbox_child.stop()
        with contextlib.suppress(Exception):
            await _drop(admin_url, name)
        if postgres is not None:
            await asyncio.to_thread(postgres.destroy)
        if ok and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"logs kept in {log_dir}")
    return 0 if ok else 1


def _report(
    args: argparse.Namespace,
    figures: Figures,
    orgs: list[Any],
    cluster: Cluster,
    gateway: Gateway,
    relay: WebhookRelay,
    load: Load,
    seen: Observed,
    checks: list[Check],
    undelivered: int,
) -> None:
    kinds = {kind: sum(1 for o in orgs if o.kind is kind) for kind in Kind}
    faulted: dict[str, int] = {}
    lost = 0
    for call in seen.calls:
        if call["fault"]:
            faulted[call["fault"]] = faulted.get(call["fault"], 0) + 1
        if call.get("applied_status") is not None:
            lost += 1
    traffic = gateway.traffic
    fives = sum(n for status, n in traffic.statuses.items() if status >= 500)
    converge = (
        f"{figures.converged - figures.faults_stopped:.1f}s"
        if figures.converged is not None
        else f"not within {args.converge_timeout:.0f}s"
    )
    rows = [
        ("flows (blocked runs)", str(args.flows)),
        ("organizations", ", ".join(f"{n} {k.value}" for k, n in kinds.items())),
        ("runs registered by a service", str(sum(len(o.registered) for o in orgs))),
        ("registrations sent", str(load.registrations)),
        ("webhook events from Mosaic", ", ".join(f"{n} {f}" for f, n in relay.received.items())),
        ("  events Mosaic gave up sending (relay too slow)", str(undelivered)),
        ("webhook deliveries (2-3 per event)", str(relay.deliveries)),
        ("  unflagged copies / late RUN_STARTED", f"{relay.unflagged} / {relay.late_started}"),
        ("replicas", f"{args.api} API + {args.workers} workers"),
        ("SIGKILLs (replica restarted)", str(cluster.kills)),
        (
            "replica exits we did not cause (restarted)",
            ", ".join(f"{n}× code {c}" for c, n in cluster.unexpected_exits.items()) or "0",
        ),
        ("PostgreSQL restarts", f"{len(figures.outages)} ({args.pg_down:.0f}s down)"),
        ("Mosaic calls", str(len(seen.calls))),
        ("  faulted", ", ".join(f"{n} {k}" for k, n in sorted(faulted.items())) or "0"),
        ("  lost answers (applied, caller saw a fault)", str(lost)),
        ("API requests answered", str(traffic.requests)),
        ("  connection errors (retried)", str(traffic.connection_errors)),
        ("  5xx", str(fives)),
        ("time to converge after faults stopped", converge),
        ("wall time", f"{time.monotonic() - figures.started:.0f}s"),
    ]
    width = max(len(name) for name, _ in rows)
    print()
    print(f"{'figure':<{width}}  value")
    print(f"{'-' * width}  {'-' * 40}")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print()
    for check in checks:
        mark = "PASS" if check.passed else "FAIL"
        extra = f" ({check.figure})" if check.figure else ""
        print(f"{mark}  {check.name}{extra}")
        for problem in check.problems[:10]:
            print(f"        {problem}")
        if len(check.problems) > 10:
            print(f"        … and {len(check.problems) - 10} more")
    passed = sum(1 for check in checks if check.passed)
    print()
    print(f"{passed} passed, {len(checks) - passed} failed")


async def _interruptible(args: argparse.Namespace) -> int:
    # SIGTERM or Ctrl-C cancels the run, so its `finally` still stops every process it started
    # and removes the private PostgreSQL.
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        return await run(args)
    except asyncio.CancelledError:
        print("chaos: interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING)
    args = parse_args(argv)
    sys.exit(asyncio.run(_interruptible(args)))
