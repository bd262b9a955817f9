"""Closed-loop load for the goals: wrk when installed, else bench/loadgen.py.

wrk (C, one event loop per thread) costs far less CPU per request than any Python client, so
the server, not the client, is what gets measured; its own CPU is reported either way. wrk
cycles through prepared raw requests (a Lua script reads them from a file), so every webhook
can carry its own run and signature.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import loadgen
from bench.env import LOOPBACK

WRK_THREADS = 2

# Requests are stored length-prefixed ("<bytes>\n<request>"), so bodies may hold anything.
WRK_SCRIPT = """
local path = os.getenv("BENCH_REQUESTS")
local f = assert(io.open(path, "rb"))
local data = f:read("*a")
f:close()
local reqs, pos = {}, 1
while pos <= #data do
  local nl = string.find(data, "\\n", pos, true)
  local len = tonumber(string.sub(data, pos, nl - 1))
  reqs[#reqs + 1] = string.sub(data, nl + 1, nl + len)
  pos = nl + len + 1
end
local next_id, threads = 0, {}
function setup(thread)
  thread:set("tid", next_id)
  next_id = next_id + 1
  threads[#threads + 1] = thread
end
function init(args)
  counter = tid
end
function request()
  local r = reqs[(counter % #reqs) + 1]
  counter = counter + THREADS
  return r
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"non2xx":%d,"errors":%d,"p50_us":%f,"p99_us":%f}\\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
""".replace("THREADS", str(WRK_THREADS))


def tool() -> str:
    """Which load generator this run uses."""
    return "wrk" if shutil.which("wrk") else "bench/loadgen.py (wrk not installed)"


@dataclass
class Load:
    """One slice of load: completed requests, wall time, latency, failures, the client's CPU."""

    requests: int = 0
    seconds: float = 0.0
    p50_ms: list[float] = field(default_factory=list)
    p99_ms: list[float] = field(default_factory=list)
    bad: int = 0  # non-2xx answers, connection errors, timeouts
    client_cpu: float = 0.0

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def merge(self, other: Load) -> None:
        self.requests += other.requests
        self.seconds += other.seconds
        self.bad += other.bad
        self.client_cpu += other.client_cpu
        self.p50_ms += other.p50_ms
        self.p99_ms += other.p99_ms

    @property
    def p50(self) -> float:
        """Median of the slices' medians (ms)."""
        ordered = sorted(self.p50_ms) or [0.0]
        return ordered[len(ordered) // 2]

    @property
    def p99(self) -> float:
        """Worst slice's p99 (ms)."""
        return max(self.p99_ms, default=0.0)


def _wrk(port: int, requests: list[bytes], connections: int, seconds: float) -> Load:
    with tempfile.TemporaryDirectory(prefix="unblock-bench-wrk-") as tmp:
        script, data = Path(tmp, "requests.lua"), Path(tmp, "requests.bin")
        script.write_text(WRK_SCRIPT)
        with data.open("wb") as out:
            for raw in requests:
                out.write(b"%d\n" % len(raw) + raw)
        process = subprocess.Popen(
            [
                "wrk",
                f"-t{WRK_THREADS}",
                f"-c{max(connections, WRK_THREADS)}",
                f"-d{max(1, round(seconds))}s",
                "--timeout",
                "30s",
                "-s",
                str(script),
                f"http://{LOOPBACK}:{port}/",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, "BENCH_REQUESTS": str(data)},
        )
        assert process.stdout is not None
        output = process.stdout.read().decode(errors="replace")
        # wait4 gives the child's own CPU (rusage), which Popen.wait would discard.
        _, status, rusage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    lines = [line for line in output.splitlines() if line.startswith('{"requests"')]
    if process.returncode != 0 or not lines:
        raise RuntimeError(f"wrk failed ({process.returncode}): {output[-500:]}")
    summary = json.loads(lines[-1])
    return Load(
        requests=summary["requests"],
        seconds=summary["duration_us"] / 1e6,
        p50_ms=[summary["p50_us"] / 1000],
        p99_ms=[summary["p99_us"] / 1000],
        bad=summary["non2xx"] + summary["errors"],
        client_cpu=rusage.ru_utime + rusage.ru_stime,
    )


async def run(port: int, requests: list[bytes], *, connections: int, seconds: float) -> Load:
    """`seconds` of load from `connections` connections, cycling through `requests` (wrk), or
    each request once (the Python fallback: size the list for the time you want)."""
    if shutil.which("wrk"):
        return await asyncio.to_thread(_wrk, port, requests, connections, seconds)
    cpu = time.process_time()
    result = await loadgen.run(port, requests, concurrency=connections)
    return Load(
        requests=result.count,
        seconds=result.wall,
        p50_ms=[result.percentile(0.5) * 1000],
        p99_ms=[result.percentile(0.99) * 1000],
        bad=sum(1 for s in result.statuses if not 200 <= s < 300),
        client_cpu=time.process_time() - cpu,
    )
