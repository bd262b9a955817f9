"""Serve a sandbox on a free loopback port from inside a test or another program."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Generator
from types import TracebackType

import uvicorn
from fastapi import FastAPI

from mosaic_sandbox.app import create_app

STARTUP_TIMEOUT = 10.0


class _EmbeddedServer(uvicorn.Server):
    # uvicorn takes over SIGINT/SIGTERM while serving; inside someone else's event loop (a test
    # run, the `unblock dev` command) those signals belong to the host program.
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class SandboxServer:
    """A sandbox served by uvicorn on 127.0.0.1.

    `async with SandboxServer() as sb:` serves on the current event loop;
    `with SandboxServer() as sb:` serves from a background thread with its own loop.
    Either way `sb.url` is the base URL and `sb.app` the FastAPI app.
    """

    def __init__(
        self,
        *,
        seed: int = 0,
        step_delay: float = 0.2,
        webhook_retry_base: float = 0.2,
        webhook_max_attempts: int = 6,
        host: str = "127.0.0.1",
        port: int = 0,
        log_level: str = "warning",
    ) -> None:
        self.app: FastAPI = create_app(
            seed=seed,
            step_delay=step_delay,
            webhook_retry_base=webhook_retry_base,
            webhook_max_attempts=webhook_max_attempts,
        )
        self.host = host
        self._port = port
        self._log_level = log_level
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    def _prepare(self) -> tuple[_EmbeddedServer, socket.socket]:
        if self._server is not None:
            raise RuntimeError("SandboxServer is already running")
        # Binding here rather than letting uvicorn bind port 0 gives the URL before serving.
        # IPPROTO_TCP explicitly: asyncio only sets TCP_NODELAY on sockets whose `proto` says
        # TCP, and without it every response waits ~40 ms for a delayed ACK.
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self._port))
        port = listener.getsockname()[1]
        self.url = f"http://{self.host}:{port}"
        config = uvicorn.Config(
            self.app,
            log_level=self._log_level,
            access_log=False,
            lifespan="on",
            # Long-polling clients must not hold a test's teardown for long.
            timeout_graceful_shutdown=2,
        )
        self._server = _EmbeddedServer(config)
        return self._server, listener

    async def __aenter__(self) -> SandboxServer:
        server, listener = self._prepare()
        self._task = asyncio.create_task(server.serve(sockets=[listener]), name="mosaic-sandbox")
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not server.started:
            if self._task.done():
                self._server = None
                raise RuntimeError("Mosaic sandbox failed to start") from _failure(self._task)
            if time.monotonic() > deadline:
                await self.__aexit__(None, None, None)
                raise RuntimeError("Mosaic sandbox did not start in time")
            await asyncio.sleep(0.005)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        server, task = self._server, self._task
        self._server = self._task = None
        if server is None or task is None:
            return
        server.should_exit = True
        await task

    def __enter__(self) -> SandboxServer:
        server, listener = self._prepare()
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [listener]}, name="mosaic-sandbox", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError("Mosaic sandbox did not start")
            time.sleep(0.005)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None or thread is None:
            return
        server.should_exit = True
        thread.join()


def _failure(task: asyncio.Task[None]) -> BaseException | None:
    if task.cancelled():
        return None
    return task.exception()
