"""A small closed-loop HTTP/1.1 load generator over keep-alive connections.

httpx spends more CPU per request than a FastAPI endpoint like /healthz does, which would make
the baseline measure the client. This writes prepared request bytes and parses only the status
line, the headers and a Content-Length body, so the server is what gets measured.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from bench.env import LOOPBACK

MAX_RESPONSE = 1 << 20
REQUEST_TIMEOUT = 30.0


def request_bytes(
    method: str, path: str, port: int, body: bytes = b"", headers: dict[str, str] | None = None
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {LOOPBACK}:{port}", "Connection: keep-alive"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@dataclass
class Result:
    """What one load phase saw: per-request latency (seconds), statuses and bodies, wall time."""

    latencies: list[float] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    wall: float = 0.0

    @property
    def count(self) -> int:
        return len(self.latencies)

    @property
    def throughput(self) -> float:
        return self.count / self.wall if self.wall else 0.0

    def merge(self, other: Result) -> None:
        self.latencies += other.latencies
        self.statuses += other.statuses
        self.bodies += other.bodies
        self.wall += other.wall

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        if not ordered:
            return 0.0
        if len(ordered) == 1:
            return ordered[0]
        return statistics.quantiles(ordered, n=1000, method="inclusive")[round(q * 1000) - 1]


class ProtocolError(Exception):
    pass


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
        raise ProtocolError(f"bad status line {lines[0]!r}")
    status = int(parts[1])
    length = None
    for line in lines[1:]:
        name, _, value = line.partition(":")
        lowered = name.strip().lower()
        if lowered == "content-length":
            length = int(value.strip())
        elif lowered == "transfer-encoding" and "chunked" in value.lower():
            raise ProtocolError("chunked responses are not expected here")
    if length is None or length > MAX_RESPONSE:
        raise ProtocolError(f"unusable Content-Length {length!r}")
    body = await reader.readexactly(length) if length else b""
    return status, body


async def run(
    port: int, requests: Sequence[bytes], *, concurrency: int, keep_bodies: bool = False
) -> Result:
    """Send every request once, `concurrency` at a time (one keep-alive connection each)."""
    result = Result()
    next_index = 0

    async def connection() -> None:
        nonlocal next_index
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        try:
            while next_index < len(requests):
                index = next_index
                next_index += 1
                started = time.perf_counter()
                writer.write(requests[index])
                status, body = await asyncio.wait_for(_read_response(reader), REQUEST_TIMEOUT)
                result.latencies.append(time.perf_counter() - started)
                result.statuses.append(status)
                if keep_bodies:
                    result.bodies.append(body)
        finally:
            writer.close()
            await writer.wait_closed()

    started = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(min(concurrency, len(requests)))))
    result.wall = time.perf_counter() - started
    return result
