"""Running unblock as an operator would: errors in one line, waiting for the database and for
migrations, readiness that knows the schema, clean shutdown, structured logs, the docs page and
CORS, and upkeep that runs once per deployment."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import structlog
from sqlalchemy.engine import make_url
from test_cli import env_for, unblock

from app import log as log_config
from app import maintenance, migrations
from app.main import create_app
from app.settings import LogFormat
from app.startup import expected_revisions
from conftest import (
    _admin_url,
    blocked_run_for,
    deliver,
    eventually,
    finished_event,
    free_port,
    fresh_database,
    isolated_stack,
    make_tenant,
    start_mosaic_run,
    wait_for_state,
)
from conftest import (
    test_settings as service_settings,
)
from mosaic_sandbox import SandboxServer

pytestmark = pytest.mark.asyncio(loop_scope="session")
ROOT = Path(__file__).resolve().parent.parent


def _plain(url: str) -> str:
    return str(make_url(url).set(drivername="postgresql"))


class Process:
    """`python -m app ARGS` with its stderr read line by line as it comes."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._new = asyncio.Event()
        assert proc.stderr is not None
        self._reader = asyncio.create_task(self._read(proc.stderr))

    @classmethod
    async def start(cls, *args: str, env: dict[str, str]) -> Process:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "app", *args, env=env, stderr=asyncio.subprocess.PIPE
        )
        return cls(proc)

    async def _read(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            self.lines.append(line.decode(errors="replace").rstrip("\n"))
            self._new.set()

    async def line_with(self, text: str, *, timeout: float = 30) -> str:
        async with asyncio.timeout(timeout):
            while True:
                for line in self.lines:
                    if text in line:
                        return line
                if self._reader.done():
                    raise AssertionError(f"exited before {text!r}: {self.lines}")
                self._new.clear()
                await self._new.wait()

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        code = await asyncio.wait_for(self.proc.wait(), 30)
        await self._reader
        return code


@contextlib.asynccontextmanager
async def running(*args: str, env: dict[str, str]) -> AsyncIterator[Process]:
    process = await Process.start(*args, env=env)
    try:
        yield process
    finally:
        if process.proc.returncode is None:
            process.proc.kill()
            await process.proc.wait()


# --------------------------------------------------------------------------------------------
# Operator errors: one line naming what to fix, exit code 2


async def _assert_one_line_error(args: list[str], env: dict[str, str], *needles: str) -> None:
    code, _, err = await unblock(*args, env=env)
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert 1 <= len(lines) <= 2, err
    for needle in needles:
        assert needle in lines[-1], err


async def test_unreachable_database_is_named_by_host_and_port() -> None:
    port = free_port()
    env = env_for(f"postgresql://postgres@127.0.0.1:{port}/x", UNBLOCK_DATABASE_WAIT="0")
    await _assert_one_line_error(["migrate"], env, f"127.0.0.1:{port}", "Connection refused")


async def test_a_missing_database_is_named() -> None:
    url = make_url(_admin_url()).set(database="unblock_no_such_database")
    env = env_for(url.render_as_string(hide_password=False))
    at = f"{url.host}:{url.port or 5432}"
    await _assert_one_line_error(["migrate"], env, "unblock_no_such_database", at)


@pytest.mark.parametrize(
    ("variable", "value", "needle"),
    [
        ("DATABASE_URL", "mysql://root@db/unblock", "must be a postgresql:// URL"),
        ("UNBLOCK_ENCRYPTION_KEY", "not-a-fernet-key", "not a Fernet key"),
        ("UNBLOCK_LOG_FORMAT", "xml", "json"),
    ],
)
async def test_a_bad_setting_is_named_with_what_it_should_be(
    variable: str, value: str, needle: str
) -> None:
    env = env_for("postgresql://postgres@127.0.0.1:1/x", **{variable: value})
    await _assert_one_line_error(["serve"], env, variable, needle)


async def test_production_without_database_url_says_so() -> None:
    env = {k: v for k, v in env_for("").items() if k != "DATABASE_URL"}
    env["UNBLOCK_ENV"] = "production"
    await _assert_one_line_error(["migrate"], env, "DATABASE_URL is not set")


async def test_a_port_in_use_is_named() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = env_for("postgresql://postgres@127.0.0.1:1/x")
        args = ["serve", "--host", "127.0.0.1", "--port", str(port)]
        await _assert_one_line_error(args, env, f"127.0.0.1:{port}", "in use")


# A sitecustomize that makes the named top-level modules look not installed: `import` and
# importlib.util.find_spec alike fail for them, in the command and in every child it starts.
_NOT_INSTALLED = """
import sys


class _NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {missing!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


sys.meta_path.insert(0, _NotInstalled())
"""


@pytest.mark.parametrize(
    ("command", "missing", "needle"),
    [
        (["sandbox"], "mosaic_sandbox", "pip install ./sandbox"),
        (["dev"], "mosaic_sandbox", "pip install ./sandbox"),
        (["dev"], "pgserver", "pip install 'unblock[embedded]'"),
    ],
)
async def test_a_part_left_out_of_production_installs_is_named_with_how_to_install_it(
    tmp_path: Path, command: list[str], missing: str, needle: str
) -> None:
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(_NOT_INSTALLED.format(missing={missing}))
    env = {k: v for k, v in env_for("").items() if k not in {"DATABASE_URL", "UNBLOCK_ENV"}}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(shim), env.get("PYTHONPATH")]))
    # Installed here, hidden there: otherwise the test would prove nothing.
    importable = [sys.executable, "-c", f"import {missing}"]
    found = await asyncio.create_subprocess_exec(*importable, cwd=tmp_path)
    assert await found.wait() == 0, f"{missing} is not installed in the test environment"
    hidden = await asyncio.create_subprocess_exec(
        *importable, cwd=tmp_path, env=env, stderr=asyncio.subprocess.DEVNULL
    )
    assert await hidden.wait() == 1

    if command == ["dev"]:
        command = [*command, "--port", str(free_port()), "--sandbox-port", str(free_port())]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "app",
        *command,
        cwd=tmp_path,  # the embedded PostgreSQL would live in ./.unblock
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err_bytes = await asyncio.wait_for(proc.communicate(), 60)
    err = err_bytes.decode()
    assert proc.returncode == 2, err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.strip()] == [err.strip()], err
    assert err.startswith("unblock: "), err
    assert needle in err, err
    assert not (tmp_path / ".unblock" / "postgres" / "PG_VERSION").exists()


async def test_migrate_needs_only_the_database() -> None:
    url = await fresh_database("ops_migrate_only", migrate=False)
    env = env_for(url)
    del env["UNBLOCK_JWT_SECRET"], env["UNBLOCK_ENCRYPTION_KEY"]
    env["UNBLOCK_ENV"] = "production"
    code, out, err = await unblock("migrate", env=env)
    assert code == 0, err
    assert "database at head" in out
    conn = await asyncpg.connect(_plain(url))
    try:
        found = {r[0] for r in await conn.fetch("SELECT version_num FROM alembic_version")}
    finally:
        await conn.close()
    assert found == expected_revisions()


async def test_version_and_help_read_like_a_product() -> None:
    code, out, _ = await unblock("--version", env=dict(os.environ))
    assert code == 0
    assert out.startswith("unblock ")
    code, out, _ = await unblock("serve", "--help", env=dict(os.environ))
    assert code == 0
    assert "--no-worker" in out
    assert "<bool>" not in out


# --------------------------------------------------------------------------------------------
# Waiting at start: for the database, and (the worker) for migrations


async def _forward(listener_port: int, target: tuple[str, int]) -> asyncio.Server:
    """A TCP forwarder to PostgreSQL: the database 'coming up' on a port that was dead."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*target)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    return await asyncio.start_server(handle, "127.0.0.1", listener_port)


async def test_worker_waits_for_an_unreachable_database_then_starts() -> None:
    url = make_url(await fresh_database("ops_wait_db"))
    dead_port = free_port()
    via_dead_port = url.set(host="127.0.0.1", port=dead_port)
    metrics_port = free_port()
    env = env_for(via_dead_port.render_as_string(hide_password=False), UNBLOCK_LOG_LEVEL="INFO")
    async with running("worker", "--metrics-port", str(metrics_port), env=env) as worker:
        await worker.line_with("waiting for the database (attempt 2)")
        attempts = [line for line in worker.lines if "waiting for the database" in line]
        assert all(f"127.0.0.1:{dead_port}" in line for line in attempts)
        forwarder = await _forward(dead_port, (url.host or "127.0.0.1", url.port or 5432))
        try:
            await worker.line_with("started", timeout=30)
            assert worker.proc.returncode is None
            assert not [line for line in worker.lines if "Traceback" in line]
            assert await worker.stop() == 0
        finally:
            forwarder.close()


async def test_worker_waits_quietly_for_migrations() -> None:
    url = await fresh_database("ops_wait_schema", migrate=False)
    env = env_for(url, UNBLOCK_LOG_LEVEL="INFO")
    async with running("worker", env=env) as worker:
        waiting = await worker.line_with("worker waiting: schema at no revision")
        assert "unblock migrate" in waiting
        code, _, err = await unblock("migrate", env=env)
        assert code == 0, err
        await worker.line_with("schema at head: the worker starts")
        await worker.line_with("started")
        assert sum("worker waiting" in line for line in worker.lines) == 1
        assert not [line for line in worker.lines if "Traceback" in line]
        assert await worker.stop() == 0


async def test_readyz_fails_naming_the_revision_until_the_schema_is_at_head() -> None:
    url = await fresh_database("ops_readyz", migrate=False)
    await asyncio.to_thread(migrations.upgrade, url, "0001")
    async with SandboxServer(step_delay=0.01) as sandbox:
        settings = service_settings(free_port(), sandbox.url)
        app = create_app(settings, database_url=url, run_worker=False)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as client,
        ):
            answer = await client.get("/readyz")
            assert answer.status_code == 503
            detail = answer.json()["detail"]
            assert "schema at 0001" in detail
            assert all(head in detail for head in expected_revisions())
            await asyncio.to_thread(migrations.upgrade, url)
            answer = await client.get("/readyz")
            assert answer.status_code == 200, answer.text


# --------------------------------------------------------------------------------------------
# Shutdown


def _postmaster_pid(pgdata: Path) -> int | None:
    pidfile = pgdata / "postmaster.pid"
    return int(pidfile.read_text().split()[0]) if pidfile.exists() else None


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def test_sigterm_stops_serve_and_its_embedded_postgres_even_after_a_crashed_run(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    port = free_port()
    env = {k: v for k, v in env_for("").items() if k != "DATABASE_URL"}
    env |= {"UNBLOCK_ENV": "dev", "UNBLOCK_DATA_DIR": str(data_dir), "UNBLOCK_LOG_LEVEL": "INFO"}
    os.chmod(tmp_path, 0o755)  # pgserver runs PostgreSQL as its own user when we are root
    code, _, err = await unblock("migrate", env=env)
    assert code == 0, err
    pgdata = data_dir / "postgres"
    assert _postmaster_pid(pgdata) is None, "migrate left its embedded PostgreSQL running"

    # A run that was killed outright leaves its handle behind; the next run must not count it.
    crashed = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    await crashed.wait()
    (pgdata / ".handle_pids.json").write_text(json.dumps([crashed.pid]))

    args = ["serve", "--host", "127.0.0.1", "--port", str(port), "--no-worker"]
    async with running(*args, env=env) as serve:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:

            async def ready() -> bool:
                with contextlib.suppress(httpx.TransportError):
                    return (await client.get("/readyz")).status_code == 200
                return False

            await eventually(ready, timeout=60, what="serve on the embedded database")
        postmaster = _postmaster_pid(pgdata)
        assert postmaster is not None
        assert _alive(postmaster)
        assert await serve.stop(signal.SIGTERM) == 0
    assert not _alive(postmaster), "the embedded PostgreSQL outlived `unblock serve`"


async def test_a_killed_dev_takes_its_sandbox_with_it() -> None:
    url = await fresh_database("ops_dev_kill")
    port, sandbox_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UNBLOCK_", "MOSAIC_"))}
    env |= {"DATABASE_URL": url, "UNBLOCK_LOG_LEVEL": "WARNING"}
    args = ["dev", "--port", str(port), "--sandbox-port", str(sandbox_port), "--runs", "1"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app", *args, env=env, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(60):
            while b"Ctrl-C" not in (line := await proc.stdout.readline()):
                assert line, "unblock dev stopped early"
    finally:
        proc.kill()  # no chance to clean up: the sandbox must go on its own
        await proc.wait()

    async def sandbox_gone() -> bool:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", sandbox_port)
        except OSError:
            return True
        writer.close()
        return False

    await eventually(sandbox_gone, timeout=10, what="the orphaned sandbox to exit")


# --------------------------------------------------------------------------------------------
# Logs


async def test_json_logs_carry_request_step_and_mosaic_context_and_no_secrets() -> None:
    url = await fresh_database("ops_logs")
    port = free_port()
    async with SandboxServer(step_delay=0.01, webhook_retry_base=0.01) as sandbox:
        env = env_for(
            url,
            UNBLOCK_LOG_FORMAT="json",
            UNBLOCK_LOG_LEVEL="DEBUG",
            UNBLOCK_PUBLIC_URL=f"http://127.0.0.1:{port}",
            MOSAIC_BASE_URL=sandbox.url,
        )
        args = ["serve", "--host", "127.0.0.1", "--port", str(port)]
        async with (
            running(*args, env=env) as serve,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=15) as client,
            httpx.AsyncClient(base_url=sandbox.url, timeout=15) as mosaic,
        ):

            async def ready() -> bool:
                with contextlib.suppress(httpx.TransportError):
                    return (await client.get("/readyz")).status_code == 200
                return False

            await eventually(ready, timeout=30, what="serve")
            tenant = await make_tenant(client, mosaic)
            run_id = await start_mosaic_run(mosaic, tenant, report=False)
            answer = await deliver(client, tenant, finished_event(run_id))
            assert answer.status_code == 202
            blocked = await blocked_run_for(client, tenant, run_id)
            await wait_for_state(client, tenant, blocked["id"], "awaiting_choice")
            traced = await client.get("/healthz", headers={"X-Request-ID": "req-ops-42"})
            assert traced.headers["x-request-id"] == "req-ops-42"
            await serve.line_with("req-ops-42")
            assert await serve.stop() == 0

    records = [json.loads(line) for line in serve.lines if line.startswith("{")]
    assert records
    assert len(records) == len(serve.lines), serve.lines[:5]
    assert any(r.get("request_id") == "req-ops-42" for r in records)
    calls = [r for r in records if r.get("mosaic_call") and r.get("step") == "check_plan"]
    assert calls, "no log line of check_plan's Mosaic calls"
    # The plan check is the organization's decision's step: it names the account, no run.
    assert calls[0]["account_id"] == tenant.account_id
    assert calls[0]["blocked_run_id"] is None
    everything = "\n".join(serve.lines)
    assert tenant.mosaic_key not in everything
    assert tenant.webhook_secret not in everything


async def test_console_logs_print_a_plain_traceback_without_local_values(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An unhandled error's traceback names the frames, never their variables: a Mosaic key in
    a frame stays out of the log, and rendering one error costs no seconds of the event loop."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    saved_structlog = structlog.get_config()
    secret = "mk_live_" + uuid.uuid4().hex

    def call_mosaic(api_key: str) -> None:
        raise RuntimeError("Mosaic is unreachable")

    try:
        log_config.configure("INFO", LogFormat.CONSOLE)
        try:
            call_mosaic(secret)
        except RuntimeError:
            logging.getLogger("app.errors").exception("unhandled error")
    finally:
        root.handlers, root.level = saved_handlers, saved_level
        structlog.configure(**saved_structlog)
    err = capsys.readouterr().err
    assert "unhandled error" in err
    assert "Traceback (most recent call last)" in err
    assert "in call_mosaic" in err
    assert "RuntimeError: Mosaic is unreachable" in err
    assert secret not in err


# --------------------------------------------------------------------------------------------
# HTTP for browsers: docs without a CDN, CORS


def _app(**overrides: Any) -> Any:
    return create_app(service_settings(free_port(), "http://127.0.0.1:9", **overrides))


async def test_docs_are_served_from_the_package_not_a_cdn() -> None:
    app = _app()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        for page in ("/docs", "/redoc"):
            html = (await c.get(page)).text
            assert "cdn." not in html, page
            assert "https://" not in html.split("<body")[0], page
        docs = (await c.get("/docs")).text
        script = docs.split('src="')[1].split('"')[0]
        asset = await c.get(script)
        assert asset.status_code == 200
        assert len(asset.content) > 100_000  # the real Swagger UI bundle


async def test_cors_preflight_is_answered_for_configured_origins_only() -> None:
    app = _app(cors_origins="https://app.example.com, https://admin.example.com")
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        allowed = await c.options(
            "/v1/blocked-runs", headers={"Origin": "https://app.example.com", **preflight}
        )
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "https://app.example.com"
        refused = await c.options(
            "/v1/blocked-runs", headers={"Origin": "https://evil.example.com", **preflight}
        )
        assert "access-control-allow-origin" not in refused.headers


# --------------------------------------------------------------------------------------------
# Upkeep: one leader per deployment


async def test_upkeep_runs_only_in_the_process_holding_the_lock() -> None:
    async with isolated_stack("ops_upkeep", decision_ttl=1, maintenance_interval=0.1) as stack:
        tenant = await make_tenant(stack.client, stack.mosaic)
        run_id = await start_mosaic_run(stack.mosaic, tenant)
        blocked = await blocked_run_for(stack.client, tenant, run_id)
        await wait_for_state(stack.client, tenant, blocked["id"], "awaiting_choice")
        # Another replica wins the election: the service's leader connection goes away and an
        # outside session takes the lock before the service can stand again.
        holder = await asyncpg.connect(_plain(stack.database_url))
        try:
            await holder.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_locks"
                " WHERE locktype = 'advisory' AND objid = $1 AND granted",
                maintenance.LOCK_KEY,
            )
            # Blocking: a terminated backend lets go of its locks a moment after the call.
            await holder.execute("SELECT pg_advisory_lock($1)", maintenance.LOCK_KEY, timeout=10)
            # Absence has no event to await: watch well past the TTL, over many intervals.
            await asyncio.sleep(2.5)
            answer = await stack.client.get(
                f"/v1/blocked-runs/{blocked['id']}", headers=tenant.headers
            )
            assert answer.json()["state"] == "awaiting_choice"
        finally:
            await holder.close()  # the lock goes with the session
        await wait_for_state(stack.client, tenant, blocked["id"], "expired", timeout=15)


async def test_a_runs_step_diagnostics_outlive_the_webhook_retention() -> None:
    async with isolated_stack(
        "ops_keep_steps", webhook_retention=0.2, maintenance_interval=0.1
    ) as stack:
        # Auto top-up on: the run goes straight to its own step, the resume.
        topup = {"enabled": True, "threshold": 0, "quantity": 0}
        tenant = await make_tenant(
            stack.client, stack.mosaic, plan_id="creator", balance=0, auto_topup=topup
        )
        run_id = await start_mosaic_run(stack.mosaic, tenant)
        blocked = await blocked_run_for(stack.client, tenant, run_id)
        await wait_for_state(stack.client, tenant, blocked["id"], "resumed")
        await maintenance.maintain(stack.service.runtime)
        conn = await asyncpg.connect(_plain(stack.database_url))
        try:

            async def inbox_pruned() -> bool:
                await maintenance.maintain(stack.service.runtime)
                return await conn.fetchval("SELECT count(*) FROM webhook_events") == 0

            await eventually(inbox_pruned, what="old webhooks to be pruned")
            steps = await conn.fetchval(
                "SELECT count(*) FROM jobs WHERE blocked_run_id = $1 AND status = 'done'",
                uuid.UUID(blocked["id"]),
            )
        finally:
            await conn.close()
        assert steps >= 1


# --------------------------------------------------------------------------------------------
# Small parts


async def test_waiting_is_for_problems_that_pass_and_names_where() -> None:
    from app.startup import _is_transient, explain

    url = "postgresql+asyncpg://svc:pw@db.internal:6543/unblock"
    shutting_down = asyncpg.CannotConnectNowError("the database system is shutting down")
    assert _is_transient(shutting_down)
    assert _is_transient(ConnectionRefusedError(111, "Connection refused"))
    assert "db.internal:6543" in explain(shutting_down, url)
    missing = asyncpg.InvalidCatalogNameError('database "unblock" does not exist')
    assert not _is_transient(missing)
    assert explain(missing, url).startswith('database "unblock" does not exist on db.internal:6543')
    refused = asyncpg.InvalidPasswordError("password authentication failed")
    assert not _is_transient(refused)
    assert "'svc'" in explain(refused, url)
    assert "pw" not in explain(refused, url).replace("password", "")


async def test_secret_named_fields_are_redacted() -> None:
    from app.log import _redact

    event = {"event": "calling", "api_key": "mk_live", "Authorization": "Bearer x", "run_id": "r"}
    assert _redact(None, "info", dict(event)) == {
        "event": "calling",
        "api_key": "[redacted]",
        "Authorization": "[redacted]",
        "run_id": "r",
    }
