"""The `unblock` command."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import socket
import sys
import uuid
from datetime import timedelta
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated, NoReturn

import typer
import uvicorn
from pydantic import ValidationError

from app import operator_cli
from app.errors import OperatorError
from app.settings import DatabaseSettings, LogFormat, Settings, env_name

cli = typer.Typer(
    help="unblock: gets credit-blocked Mosaic agent runs moving again.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
accounts_cli = typer.Typer(help="Manage accounts.", no_args_is_help=True)
cli.add_typer(accounts_cli, name="accounts")
# Operator commands (runs, webhooks, deliveries, subscriptions) live in their own module.
operator_cli.register(cli)

Host = Annotated[str, typer.Option(help="Interface to bind.")]
Port = Annotated[int, typer.Option(help="Port to bind.")]


def _version(value: bool) -> None:
    if value:
        try:
            typer.echo(f"unblock {version('unblock')}")
        except PackageNotFoundError:  # run from a source tree that was never installed
            typer.echo("unblock (not installed)")
        raise typer.Exit()


@cli.callback()
def _root(
    show_version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """unblock: gets credit-blocked Mosaic agent runs moving again."""


def get_settings(kind: type[Settings] = Settings) -> Settings:
    """The settings, or a one-line reason per problem (naming the variable) and exit code 2."""
    try:
        return kind()
    except ValidationError as exc:
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else ""
            where = env_name(field) if field else "configuration"
            message = str(error["msg"]).removeprefix("Value error, ")
            typer.echo(f"unblock: {where}: {message}", err=True)
        raise typer.Exit(2) from None


def _logging(settings: Settings | None = None) -> None:
    from app import log

    # `dev` configures logging before its settings exist; the environment says the same then.
    if settings is None:
        level = os.environ.get("UNBLOCK_LOG_LEVEL", "INFO")
        fmt = os.environ.get("UNBLOCK_LOG_FORMAT", "console").lower()
        log.configure(level, LogFormat.JSON if fmt == "json" else LogFormat.CONSOLE)
    else:
        log.configure(settings.log_level, settings.log_format)


def _database(settings: Settings, wait: timedelta) -> str:
    """The database URL, once PostgreSQL answers (waiting up to `wait` for it)."""
    from app.database import resolve_database_url
    from app.startup import wait_for_database

    url = resolve_database_url(settings)
    asyncio.run(wait_for_database(url, wait))
    return url


def listen(host: str, port: int) -> socket.socket:
    """A bound socket for uvicorn: a port in use is one line here, not a traceback later."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OperatorError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


SANDBOX_MISSING = (
    "the Mosaic sandbox (mosaic_sandbox) is not installed: "
    "pip install ./sandbox from the unblock checkout (or make install)"
)


def require_sandbox() -> None:
    """The sandbox is a distribution of its own (sandbox/), absent from production installs.

    Looked up, not imported: the service's process stays out of the sandbox's import graph.
    """
    try:
        found = importlib.util.find_spec("mosaic_sandbox") is not None
    except ImportError:  # a finder may refuse the name outright rather than not find it
        found = False
    if not found:
        raise OperatorError(SANDBOX_MISSING)


def _exit_cleanly_on_signals() -> None:
    # Until uvicorn takes the signals over (and after, for what follows), a signal ends the
    # command as SystemExit: atexit hooks still run, and the embedded PostgreSQL stops.
    def stop(signum: int, _frame: object) -> NoReturn:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


@cli.command()
def serve(
    host: Host = "127.0.0.1",
    port: Port = 8000,
    worker: Annotated[
        bool | None,
        typer.Option(
            "--worker/--no-worker", help="Run the worker too (default: UNBLOCK_RUN_WORKER)."
        ),
    ] = None,
) -> None:
    """Run the HTTP API (and, by default, the worker) in one process."""
    from app.http_server import server_options
    from app.main import create_app
    from app.startup import Server

    settings = get_settings()
    _logging(settings)
    _exit_cleanly_on_signals()
    sock = listen(host, port)
    url = _database(settings, settings.database_wait)
    app = create_app(settings, database_url=url, run_worker=worker)
    config = uvicorn.Config(app, log_config=None, proxy_headers=True, **server_options(settings))
    Server(config).run(sockets=[sock])


@cli.command("worker")
def run_worker(
    metrics_port: Annotated[
        int | None, typer.Option(help="Serve Prometheus metrics (and a liveness target) here.")
    ] = None,
) -> None:
    """Run only the worker (for a deployment that scales it apart from the API)."""
    from prometheus_client import start_http_server

    from app.database import resolve_database_url
    from app.runtime import Runtime
    from app.startup import wait_for_database
    from app.worker import Worker

    settings = get_settings()
    _logging(settings)
    url = resolve_database_url(settings)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        waiting = asyncio.create_task(wait_for_database(url, settings.database_wait))
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({waiting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not waiting.done():
            waiting.cancel()
            return
        waiting.result()
        rt = await Runtime.start(settings, url)
        if metrics_port is not None:  # up once the worker can run, so it doubles as liveness
            start_http_server(metrics_port)
        try:
            await Worker(rt).run(stop)
        finally:
            await rt.close()

    asyncio.run(main())


@cli.command()
def migrate(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
    down: Annotated[bool, typer.Option("--down", help="Downgrade to REVISION.")] = False,
) -> None:
    """Bring the database schema to a revision (default: the newest)."""
    from app import migrations

    settings = get_settings(DatabaseSettings)
    _logging(settings)
    url = _database(settings, settings.database_wait)
    if down:
        migrations.downgrade(url, revision)
    else:
        migrations.upgrade(url, revision)
    typer.echo(f"database at {'down to ' if down else ''}{revision}")


@cli.command()
def sandbox(
    host: Host = "127.0.0.1",
    port: Port = 8100,
    seed: Annotated[int, typer.Option(help="Seed for ids and fault rates.")] = 0,
    step_delay: Annotated[float, typer.Option(help="Seconds between run nodes.")] = 0.2,
) -> None:
    """Run the local Mosaic sandbox (package unblock-sandbox: pip install ./sandbox).

    A separate distribution, installed by `make install`; the service never imports it.
    """
    require_sandbox()
    # A child process keeps the sandbox out of the service's import graph.
    args = [
        "--host",
        host,
        "--port",
        str(port),
        "--seed",
        str(seed),
        "--step-delay",
        str(step_delay),
    ]
    os.execvp(sys.executable, [sys.executable, "-m", "mosaic_sandbox", *args])


@cli.command()
def dev(
    port: Port = 8000,
    sandbox_port: Annotated[int, typer.Option(help="Port of the Mosaic sandbox.")] = 8100,
    runs: Annotated[int, typer.Option(help="Blocked runs to make for the demo.")] = 3,
) -> None:
    """Embedded Postgres, the sandbox, the service and a demo account with blocked runs."""
    from app.dev import run_dev

    require_sandbox()  # before the embedded PostgreSQL starts or a port is taken
    _logging()
    _exit_cleanly_on_signals()
    sock = listen("127.0.0.1", port)
    listen("127.0.0.1", sandbox_port).close()  # the sandbox binds it; fail here if it cannot
    asyncio.run(run_dev(sock=sock, sandbox_port=sandbox_port, runs=runs))


@cli.command()
def token(
    sub: Annotated[str, typer.Option(help="Subject (who acts).")] = "dev-user",
    account_id: Annotated[str | None, typer.Option(help="The account the token acts for.")] = None,
    scope: Annotated[
        list[str] | None,
        typer.Option(help="Scope; repeat for several. Default: runs:read runs:write."),
    ] = None,
    ttl: Annotated[int, typer.Option(help="Lifetime in seconds.")] = 3600,
) -> None:
    """Mint an HS256 token with UNBLOCK_JWT_SECRET, for local use."""
    from app.auth import mint_token

    settings = get_settings()
    if settings.jwt_secret is None:
        raise typer.BadParameter("UNBLOCK_JWT_SECRET is not set")
    if account_id is not None:
        uuid.UUID(account_id)
    scopes = scope or ["runs:read", "runs:write"]
    typer.echo(
        mint_token(
            settings.jwt_secret.get_secret_value(),
            sub=sub,
            scopes=scopes,
            account_id=account_id,
            ttl_seconds=ttl,
        )
    )


@accounts_cli.command("create")
def create_account(
    name: Annotated[str, typer.Option(help="Account name.")],
    mosaic_api_key: Annotated[
        str, typer.Option(envvar="MOSAIC_API_KEY", help="The organization's Mosaic key (mk_…).")
    ],
    webhook_secret: Annotated[
        str | None, typer.Option(help="X-Mosaic-Signature secret; generated when omitted.")
    ] = None,
) -> None:
    """Create an account directly in the database; prints it as JSON (the secret only once)."""
    from pydantic import SecretStr

    from app.accounts import service
    from app.accounts.schemas import AccountCreate
    from app.accounts.secrets import Keyring
    from app.database import Database

    settings = get_settings()
    try:
        body = AccountCreate(
            name=name,
            mosaic_api_key=SecretStr(mosaic_api_key),
            webhook_secret=SecretStr(webhook_secret) if webhook_secret else None,
        )
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise typer.BadParameter(problems) from None

    url = _database(settings, timedelta(0))

    async def main() -> str:
        db = Database(url)
        try:
            async with db.transaction() as session:
                created = await service.create(
                    session, Keyring(settings.encryption_keys), body, settings.public_url
                )
        finally:
            await db.dispose()
        return created.model_dump_json(indent=2, exclude_none=True)

    typer.echo(asyncio.run(main()))


@accounts_cli.command("rotate-keys")
def rotate_keys() -> None:
    """Re-encrypt every stored Mosaic key under the first UNBLOCK_ENCRYPTION_KEY.

    After rotating (new key first, old keys after it), run this; then the old keys can go.
    """
    from app.accounts.secrets import Keyring
    from app.accounts.service import reencrypt_keys
    from app.database import Database

    settings = get_settings()
    url = _database(settings, timedelta(0))

    async def main() -> int:
        db = Database(url)
        try:
            async with db.transaction() as session:
                return await reencrypt_keys(session, Keyring(settings.encryption_keys))
        finally:
            await db.dispose()

    typer.echo(f"re-encrypted {asyncio.run(main())} account key(s) under the newest key")


@cli.command()
def openapi() -> None:
    """Print the OpenAPI document (committed as openapi/openapi.json)."""
    from app.main import openapi_document

    typer.echo(json.dumps(openapi_document(), indent=2, sort_keys=True))


def main() -> None:
    """The `unblock` console script: operator errors end in one line and exit code 2."""
    try:
        cli()
    except OperatorError as exc:
        typer.echo(f"unblock: {exc}", err=True)
        sys.exit(2)
