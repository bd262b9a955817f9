"""A private PostgreSQL server for one chaos run, so restarting it disturbs nobody else.

Built from the machine's PostgreSQL binaries (`/usr/lib/postgresql/*/bin`), or the `pgserver`
wheel's when there are none. `initdb` refuses to run as root, so as root the server runs as the
`postgres` user.
"""

from __future__ import annotations

import asyncio
import glob
import os
import pwd
import shutil
import subprocess
from pathlib import Path

from bench.env import LOOPBACK, free_port


def _binaries() -> Path:
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if Path(candidate, "initdb").exists():
            return Path(candidate)
    import pgserver  # the wheel ships a whole installation

    return Path(pgserver.__file__).parent / "pginstall" / "bin"


class PrivatePostgres:
    """`initdb` into `root`, serve on a free loopback port; `restart` is a hard outage."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "pgdata"
        self.port = free_port()
        self.bin = _binaries()
        self._as_postgres: list[str] = []
        if os.geteuid() == 0:
            self._as_postgres = ["runuser", "-u", "postgres", "--"]
            owner = pwd.getpwnam("postgres")
            os.chown(root, owner.pw_uid, owner.pw_gid)

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@{LOOPBACK}:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        subprocess.run(
            [*self._as_postgres, *args],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def _options(self) -> str:
        # fsync off: the outage is a server restart, not a machine crash, so the OS keeps what
        # was written, and the disk is shared. synchronous_commit stays on: an immediate stop
        # would otherwise lose commits the service was already told about.
        return (
            f"-p {self.port} -c listen_addresses={LOOPBACK} -c unix_socket_directories={self.root}"
            " -c fsync=off -c full_page_writes=off -c max_connections=400"
        )

    def start(self) -> None:
        if not self.data.exists():
            self._run(
                str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust",
                "-E", "UTF8", "--no-sync",
            )  # fmt: skip
        self._run(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", self._options(),
            "-l", str(self.root / "postgres.log"), "-w", "-t", "60", "start",
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    async def outage(self, seconds: float) -> None:
        """Stop the server at once (open connections are cut), keep it down, start it again."""
        await asyncio.to_thread(self.stop, "immediate")
        # The outage length is the fault itself, not a wait for something to happen.
        await asyncio.sleep(seconds)
        await asyncio.to_thread(self.start)

    def destroy(self) -> None:
        try:
            self.stop("immediate")
        except subprocess.CalledProcessError:
            pass  # already down
        shutil.rmtree(self.root, ignore_errors=True)
