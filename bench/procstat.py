"""Memory and CPU of processes, from /proc (Linux).

The peak (VmHWM) is reset before each phase by writing 5 to /proc/PID/clear_refs, so a phase's
peak is its own and not the process's lifetime maximum (which is all getrusage's ru_maxrss gives).
Where that is not allowed, a sampler reading VmRSS every few milliseconds stands in for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

SAMPLE_EVERY = 0.005


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(f"{field} not in /proc/{pid}/status")


def rss_kib(pid: int) -> int:
    return _status_kib(pid, "VmRSS")


def reset_peak(pid: int) -> bool:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@dataclass
class Usage:
    before_kib: int = 0
    peak_kib: int = 0
    after_kib: int = 0
    method: str = ""

    @property
    def growth_kib(self) -> int:
        return max(0, self.peak_kib - self.before_kib)


@contextlib.asynccontextmanager
async def watch(pid: int) -> AsyncIterator[Usage]:
    """Peak RSS of `pid` while the block runs, and its RSS before and after."""
    usage = Usage(before_kib=rss_kib(pid))
    exact = reset_peak(pid)
    usage.before_kib = rss_kib(pid)
    sampled = usage.before_kib
    stop = asyncio.Event()

    async def sample() -> None:
        nonlocal sampled
        while not stop.is_set():
            sampled = max(sampled, rss_kib(pid))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SAMPLE_EVERY)

    sampler = None if exact else asyncio.create_task(sample())
    try:
        yield usage
    finally:
        stop.set()
        if sampler is not None:
            await sampler
        usage.after_kib = rss_kib(pid)
        if exact:
            usage.peak_kib = _status_kib(pid, "VmHWM")
            usage.method = "VmHWM reset via clear_refs"
        else:
            usage.peak_kib = max(sampled, usage.after_kib)
            usage.method = f"VmRSS sampled every {SAMPLE_EVERY * 1000:.0f} ms"


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time `pid` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def postgres_cpu_seconds(database: str) -> float:
    """CPU time of the live PostgreSQL backends connected to `database`.

    A backend's process title names its database ("postgres: 15/main: USER DB HOST(PORT) ..."),
    so other programs' backends on a shared server are left out, and so is the server's own
    background work (WAL writer, checkpointer). Backends that exit during a phase take their time
    with them; the service and the workers keep their connections pooled.
    """
    total = 0.0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if (proc / "comm").read_text().strip() != "postgres":
                continue
            title = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if f" {database} " in f" {title} ".replace(":", " "):
                total += cpu_seconds(int(proc.name))
        except (OSError, ValueError):
            continue
    return total


@dataclass
class Cpu:
    """CPU seconds spent by this process, another process and Postgres backends during a block."""

    own: float = 0.0
    other: float = 0.0
    postgres: float = 0.0

    def add(self, more: Cpu) -> None:
        self.own += more.own
        self.other += more.other
        self.postgres += more.postgres


@contextlib.contextmanager
def cpu(other_pid: int | None, database: str) -> Iterator[Cpu]:
    """CPU used by this process, by `other_pid` and by `database`'s Postgres backends."""
    usage = Cpu()
    own, pg = time.process_time(), postgres_cpu_seconds(database)
    other = cpu_seconds(other_pid) if other_pid else 0.0
    try:
        yield usage
    finally:
        usage.own = time.process_time() - own
        usage.postgres = postgres_cpu_seconds(database) - pg
        usage.other = (cpu_seconds(other_pid) - other) if other_pid else 0.0
