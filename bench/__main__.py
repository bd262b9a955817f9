"""`python -m bench` (`make bench`): every benchmark, ratios against baselines from this run.

Exits 1 when a correctness check fails (a webhook stored twice, a job run twice, ...); the ratios
themselves are reported, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import sys
import time

import httpx

from bench import goals, ingest, workers
from bench.env import (
    LOOPBACK,
    Child,
    bench_settings,
    check_loopback,
    children,
    drop_databases,
    free_port,
    fresh_database,
    start_sandbox,
    start_service,
)

GOALS = ["p1", "p2", "p3", "p4", "p5", "steps"]


def wants(args: argparse.Namespace, *names: str) -> bool:
    """Whether this run includes any of the named benchmarks or goals."""
    if args.only is None:
        return True
    if args.only == "goals":
        return any(name in GOALS for name in names)
    return args.only in names


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--webhooks", type=int, default=2000, help="webhooks to ingest (2000)")
    parser.add_argument("--concurrency", type=int, default=32, help="ingest concurrency (32)")
    parser.add_argument("--jobs", type=int, default=1000, help="check_plan jobs per round (1000)")
    parser.add_argument("--workers", type=int, default=4, help="workers in the scaled round (4)")
    parser.add_argument(
        "--no-processes", action="store_true", help="skip the round with worker processes"
    )
    parser.add_argument(
        "--only",
        choices=["ingest", "workers", "goals", *GOALS],
        help="run one benchmark (ingest includes memory); goals: every goal; p1, p2 and p5 "
        "share one round",
    )
    parser.add_argument("--goal-seconds", type=float, default=5.0, help="per goal slice (5)")
    parser.add_argument(
        "--release-runs", type=int, default=10_000, help="P3: runs one decision releases (10000)"
    )
    parser.add_argument(
        "--large-rows", type=int, default=1_000_000, help="P4: blocked runs in the large database"
    )
    args = parser.parse_args()
    for name in ("webhooks", "concurrency", "jobs", "workers", "release_runs"):
        if not 1 <= getattr(args, name) <= 100_000:
            parser.error(f"--{name} must be between 1 and 100000")
    if not 1_000 <= args.large_rows <= 10_000_000:
        parser.error("--large-rows must be between 1000 and 10000000")
    if not 1 <= args.goal_seconds <= 120:
        parser.error("--goal-seconds must be between 1 and 120")
    return args


async def main(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    print(
        f"unblock benchmarks: python {platform.python_version()}, {os.cpu_count()} CPUs, "
        f"all traffic on {LOOPBACK}",
        flush=True,
    )
    try:
        return await _run(args, started)
    finally:
        await drop_databases()


async def _run(args: argparse.Namespace, started: float) -> int:
    database_url = await fresh_database()
    ok = True
    async with children() as running:
        sandbox_proc = await start_sandbox(step_delay=0.01)
        running.append(sandbox_proc)
        service_proc = await start_service(database_url, sandbox_proc.url, worker=False)
        running.append(service_proc)
        for url in (sandbox_proc.url, service_proc.url):
            check_loopback(url)
        print(f"setup (database, sandbox, service): {time.perf_counter() - started:.1f}s\n")

        async with (
            httpx.AsyncClient(base_url=service_proc.url, timeout=30) as api,
            httpx.AsyncClient(base_url=sandbox_proc.url, timeout=30) as sandbox,
        ):
            memory_text = ""
            if wants(args, "ingest"):
                outcome = await ingest.run(
                    database_url,
                    service_proc,
                    sandbox,
                    api,
                    ingest.IngestConfig(webhooks=args.webhooks, concurrency=args.concurrency),
                )
                ok &= outcome.ok
                memory_text = outcome.memory_text
                print(outcome.text + "\n", flush=True)
            step_cpu = None
            if wants(args, "workers", "steps"):
                result = await workers.run(
                    bench_settings(free_port(), sandbox_proc.url),
                    await fresh_database("workers"),
                    sandbox,
                    sandbox_proc,
                    workers.WorkerConfig(
                        jobs=args.jobs, many=args.workers, processes=not args.no_processes
                    ),
                )
                ok &= result.ok
                step_cpu = result.baseline.worker_cpu / max(result.baseline.jobs, 1)
                print(result.text + "\n", flush=True)
            if memory_text:  # measured during benchmark 1, numbered and shown last
                print(memory_text + "\n", flush=True)
            if wants(args, *GOALS):
                ok &= await _goals(
                    args, database_url, running, sandbox_proc, service_proc, step_cpu
                )

    print(
        f"total {time.perf_counter() - started:.1f}s; checks "
        + ("passed" if ok else "FAILED (see problems above)")
    )
    return 0 if ok else 1


async def _goals(
    args: argparse.Namespace,
    database_url: str,
    running: list[Child],
    sandbox_proc: Child,
    service_proc: Child,
    step_cpu: float | None,
) -> bool:
    """The goals of issue 13's kind: each ratio with its bound, PASS or MISS."""
    outcome = goals.GoalOutcome()
    load = os.getloadavg()
    async with (
        httpx.AsyncClient(base_url=service_proc.url, timeout=60) as api,
        httpx.AsyncClient(base_url=sandbox_proc.url, timeout=60) as sandbox,
    ):
        if wants(args, "p1", "p2", "p5"):
            bare = await goals.start_bare(database_url)
            running.append(bare)
            config = goals.IngestConfig(seconds=args.goal_seconds)
            outcome.merge(
                await goals.ingest_goals(database_url, service_proc, bare, api, sandbox, config)
            )
            bare.stop()
        if wants(args, "p4"):
            outcome.merge(
                await goals.read_goals(sandbox_proc, sandbox, args.large_rows, args.goal_seconds)
            )
        if wants(args, "p3"):
            outcome.merge(await goals.release_goal(sandbox_proc, sandbox, args.release_runs))
    if step_cpu is not None:
        outcome.goals.append(
            goals.Goal(
                "steps",
                "worker CPU per check_plan step (ms)",
                "1.5 ms",
                f"{step_cpu * 1000:.2f} ms",
                step_cpu * 1000,
                1.5,
                False,
            )
        )
    after = os.getloadavg()
    print(
        f"Goals (ratios against same-run baselines; load average {load[0]:.2f} before, "
        f"{after[0]:.2f} after, {os.cpu_count()} CPUs)"
    )
    print(goals.header())
    for goal in outcome.goals:
        print(goal.line())
    for line in outcome.lines:
        print(line)
    for problem in outcome.problems:
        print(f"  problem: {problem}")
    missed = [g.name for g in outcome.goals if not g.passed]
    print(f"  {len(outcome.goals) - len(missed)} PASS, {len(missed)} MISS\n", flush=True)
    return not outcome.problems


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(asyncio.run(main(parse_args())))
