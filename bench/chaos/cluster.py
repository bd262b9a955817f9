"""The deployment under test: API replicas (`unblock serve --no-worker`) and worker replicas
(`unblock worker`), each a real process; a supervisor restarts any that dies, like an
orchestrator would, and a killer sends SIGKILL to a random one every few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx

from bench.env import LOOPBACK, ROOT, free_port


@dataclass
class Replica:
    name: str
    args: list[str]
    log_path: Path
    port: int | None = None
    process: asyncio.subprocess.Process | None = None
    starts: int = 0
    killed_by_us: int = 0
    # Exits we did not cause (e.g. a replica that gives up while PostgreSQL is down): code → n.
    other_exits: dict[int, int] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None


class Cluster:
    """Starts, supervises and kills the replicas; stops them all on `stop()`."""

    def __init__(
        self,
        *,
        api: int,
        workers: int,
        env: Mapping[str, str],
        log_dir: Path,
        rng: random.Random,
    ) -> None:
        self._env = {**os.environ, **env}
        self._rng = rng
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        self._logs: list[IO[bytes]] = []
        self.apis = [
            Replica(f"api-{i}", [], log_dir / f"api-{i}.log", port=free_port()) for i in range(api)
        ]
        for replica in self.apis:
            replica.args = ["serve", "--no-worker", "--host", LOOPBACK, "--port", str(replica.port)]
        self.workers = [
            Replica(f"worker-{i}", ["worker"], log_dir / f"worker-{i}.log") for i in range(workers)
        ]

    @property
    def replicas(self) -> list[Replica]:
        return [*self.apis, *self.workers]

    @property
    def kills(self) -> int:
        return sum(r.killed_by_us for r in self.replicas)

    @property
    def unexpected_exits(self) -> dict[int, int]:
        total: dict[int, int] = {}
        for replica in self.replicas:
            for code, n in replica.other_exits.items():
                total[code] = total.get(code, 0) + n
        return total

    def api_url(self) -> str:
        """A replica to send a request to, as a load balancer would (a live one if any)."""
        live = [r for r in self.apis if r.alive] or self.apis
        return self._rng.choice(live).url

    async def _spawn(self, replica: Replica) -> None:
        log = replica.log_path.open("ab")
        self._logs.append(log)
        replica.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "app", *replica.args,
            cwd=ROOT, env=self._env, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
        )  # fmt: skip
        replica.starts += 1

    async def _supervise(self, replica: Replica) -> None:
        while not self._stopping:
            await self._spawn(replica)
            assert replica.process is not None
            code = await replica.process.wait()
            if self._stopping:
                return
            if code != -signal.SIGKILL:
                replica.other_exits[code] = replica.other_exits.get(code, 0) + 1
                # A replica that exits by itself (database down at start) is restarted after a
                # pause, as an orchestrator's restart backoff would.
                await asyncio.sleep(0.5)

    async def start(self) -> None:
        """Start every replica and wait until each API replica answers /readyz."""
        for replica in self.replicas:
            self._tasks.append(asyncio.create_task(self._supervise(replica)))
        deadline = time.monotonic() + 60
        async with httpx.AsyncClient(timeout=2) as http:
            for replica in self.apis:
                while True:
                    try:
                        if (await http.get(f"{replica.url}/readyz")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{replica.name} not ready; see {replica.log_path}")
                    await asyncio.sleep(0.1)

    def kill_one(self) -> Replica | None:
        """SIGKILL a random live replica (the supervisor restarts it)."""
        live = [r for r in self.replicas if r.alive]
        if not live:
            return None
        victim = self._rng.choice(live)
        assert victim.process is not None
        victim.killed_by_us += 1
        victim.process.send_signal(signal.SIGKILL)
        return victim

    async def killer(self, stop: asyncio.Event, every: tuple[float, float]) -> None:
        """Kill a random replica every `every` seconds (uniform) until `stop` is set."""
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self._rng.uniform(*every))
            except TimeoutError:
                self.kill_one()

    async def stop(self) -> None:
        self._stopping = True
        for replica in self.replicas:
            if replica.alive:
                assert replica.process is not None
                with contextlib.suppress(ProcessLookupError):
                    replica.process.terminate()
        for replica in self.replicas:
            if replica.process is not None:
                try:
                    await asyncio.wait_for(replica.process.wait(), 15)
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        replica.process.kill()
                    await replica.process.wait()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for log in self._logs:
            log.close()
