"""`python -m bench.worker_process`: one `app.worker.Worker` on its own Runtime, in its own process.

The process connects, prints `ready`, waits for a line on stdin (the parent's start signal, so
every replica's clock starts together), then works until SIGTERM or stdin closes.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from app.runtime import Runtime
from app.worker import Worker
from bench.env import child_settings


async def main() -> None:
    settings, database_url = child_settings(0)
    rt = await Runtime.start(settings, database_url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        print("ready", flush=True)
        if await asyncio.to_thread(sys.stdin.readline):
            await Worker(rt).run(stop)
    finally:
        await rt.close()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main())
