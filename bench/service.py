"""`python -m bench.service --port P [--no-worker]`: the service for a benchmark, in a process
of its own.

Settings are built directly (no environment parsing beyond the few values the parent hands over),
the app is `create_app(settings, database_url=..., run_worker=...)`, served by uvicorn on
127.0.0.1 with the same defaults `unblock serve` uses (uvloop and httptools when installed).
"""

from __future__ import annotations

import argparse
import logging

import uvicorn

from app.main import create_app
from bench.env import LOOPBACK, child_settings


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench.service")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--no-worker", action="store_true")
    args = parser.parse_args()

    logging.basicConfig(level=logging.WARNING)
    settings, database_url = child_settings(args.port)
    app = create_app(settings, database_url=database_url, run_worker=not args.no_worker)
    uvicorn.run(
        app,
        host=LOOPBACK,
        port=args.port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
    )


if __name__ == "__main__":
    main()
