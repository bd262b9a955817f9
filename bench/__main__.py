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

from bench import ingest, workers
from bench.env import (
    LOOPBACK,
    bench_settings,
    check_loopback,
    children,
    drop_databases,
    free_port,
    fresh_database,
    start_sandbox,
    start_service,
)


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
        "--only", choices=["ingest", "workers"], help="run one benchmark (ingest includes memory)"
    )
    args = parser.parse_args()
    for name in ("webhooks", "concurrency", "jobs", "workers"):
        if not 1 <= getattr(args, name) <= 100_000:
            parser.error(f"--{name} must be between 1 and 100000")
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
            if args.only in (None, "ingest"):
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
            if args.only in (None, "workers"):
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
                print(result.text + "\n", flush=True)
            if memory_text:  # measured during benchmark 1, numbered and shown last
                print(memory_text + "\n", flush=True)

    print(
        f"total {time.perf_counter() - started:.1f}s; checks "
        + ("passed" if ok else "FAILED (see problems above)")
    )
    return 0 if ok else 1


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(asyncio.run(main(parse_args())))
