"""`python -m mosaic_sandbox` and `unblock sandbox`: serve a sandbox until interrupted."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import uvicorn

from mosaic_sandbox.app import create_app

DEFAULT_PORT = 8900


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mosaic_sandbox",
        description="Serve a local double of the Mosaic API (see docs/sandbox.md).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (127.0.0.1)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port ({DEFAULT_PORT})")
    parser.add_argument("--seed", type=int, default=0, help="seed for ids and fault rates (0)")
    parser.add_argument(
        "--step-delay", type=float, default=0.2, help="seconds each run node takes (0.2)"
    )
    parser.add_argument(
        "--webhook-retry-base",
        type=float,
        default=0.2,
        help="first webhook retry delay in seconds, doubled each attempt (0.2)",
    )
    parser.add_argument(
        "--webhook-max-attempts", type=int, default=6, help="webhook attempts in all (6)"
    )
    parser.add_argument("--log-level", default="info", help="uvicorn log level (info)")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    app = create_app(
        seed=args.seed,
        step_delay=args.step_delay,
        webhook_retry_base=args.webhook_retry_base,
        webhook_max_attempts=args.webhook_max_attempts,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
