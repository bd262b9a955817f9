"""Operator commands: `unblock runs …`, `unblock webhooks replay`, `unblock deliveries …`,
`unblock subscriptions …`.

They act straight on the database, like `unblock accounts create`. Where the API has the same
action (retry, cancel, redeliver, enable), the command calls the same service function, as
`operator:<user>` in the history. A refusal (unknown id, a state that does not allow it) is one
line on stderr and exit code 1.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Annotated, Any, TypeVar

import typer

from app.errors import DomainError

runs_cli = typer.Typer(help="Find, inspect, retry and cancel blocked runs.", no_args_is_help=True)
webhooks_cli = typer.Typer(help="Stored Mosaic webhooks.", no_args_is_help=True)
deliveries_cli = typer.Typer(help="Outbound notification deliveries.", no_args_is_help=True)
subscriptions_cli = typer.Typer(help="Outbound notification subscriptions.", no_args_is_help=True)

T = TypeVar("T")
As = Annotated[
    str | None, typer.Option("--as", help="Who acts (default: the login name); history shows it.")
]


def register(cli: typer.Typer) -> None:
    """Add the operator commands to the `unblock` command."""
    cli.add_typer(runs_cli, name="runs")
    cli.add_typer(webhooks_cli, name="webhooks")
    cli.add_typer(deliveries_cli, name="deliveries")
    cli.add_typer(subscriptions_cli, name="subscriptions")


def _operator(name: str | None) -> str:
    return f"operator:{name or getpass.getuser()}"


def _with_runtime(work: Callable[[Any], Awaitable[T]]) -> T:
    """Run `work(rt)` with a runtime on the configured database; refusals become one line."""
    from app.cli import _logging, get_settings
    from app.runtime import Runtime

    settings = get_settings()
    _logging(settings)

    async def main() -> T:
        rt = await Runtime.start(settings)
        try:
            return await work(rt)
        finally:
            await rt.close()

    try:
        return asyncio.run(main())
    except DomainError as exc:
        typer.echo(f"unblock: {exc.detail}", err=True)
        raise typer.Exit(1) from None


def _uuid(value: str, what: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise typer.BadParameter(f"{what} must be a UUID, not {value!r}") from None


def _when(value: Any) -> str:
    return value.isoformat(timespec="seconds") if value is not None else "-"


def _one_line(value: str | None, width: int = 80) -> str:
    if not value:
        return "-"
    flat = " ".join(value.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


@runs_cli.command("list")
def list_runs(
    account: Annotated[str | None, typer.Option(help="Only this account's runs.")] = None,
    state: Annotated[str | None, typer.Option(help="Comma-separated states.")] = None,
    stuck: Annotated[
        bool,
        typer.Option(
            "--stuck", help="Open runs unchanged for --stuck-after, or whose step keeps failing."
        ),
    ] = False,
    stuck_after: Annotated[int, typer.Option(help="Minutes (with --stuck).")] = 30,
    limit: Annotated[int, typer.Option(min=1, max=10_000)] = 100,
) -> None:
    """Blocked runs, newest first: id, account, Mosaic run, state, since, current step."""
    from app import operator_views
    from app.blocked_runs.service import states_filter

    account_id = _uuid(account, "--account") if account else None

    async def work(rt: Any) -> list[str]:
        states = states_filter(state)
        async with rt.db.sessions() as session:
            found = await operator_views.runs(
                session,
                account_id=account_id,
                states=states,
                stuck_after=timedelta(minutes=stuck_after) if stuck else None,
                limit=limit,
            )
            lines = ["id\taccount\trun_id\tstate\tsince\tstep\tattempts\tlast_error"]
            for run in found:
                step = await operator_views.current_step(session, run)
                lines.append(
                    "\t".join(
                        [
                            str(run.id),
                            str(run.account_id),
                            run.run_id,
                            run.state,
                            _when(run.state_changed_at),
                            step.kind if step else "-",
                            str(step.attempts) if step else "-",
                            _one_line(step.last_error if step else None),
                        ]
                    )
                )
            return lines

    typer.echo("\n".join(_with_runtime(work)))


@runs_cli.command("show")
def show_run(blocked_run_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """One run as JSON: its fields, its history, and its current step's last error."""
    from app import operator_views

    run_id = _uuid(blocked_run_id, "ID")

    async def work(rt: Any) -> dict[str, Any]:
        async with rt.db.sessions() as session:
            run = await operator_views.run(session, run_id)
            history = await operator_views.history(session, run_id)
            step = await operator_views.current_step(session, run)
            if step is None:
                step = await operator_views.last_step(session, run)
            return {
                "id": str(run.id),
                "account_id": str(run.account_id),
                "run_id": run.run_id,
                "agent_id": run.agent_id,
                "state": run.state,
                "pending": run.pending,
                "error": {"code": run.error_code, "message": run.error_message}
                if run.error_code
                else None,
                "created_at": _when(run.created_at),
                "state_changed_at": _when(run.state_changed_at),
                "step": None
                if step is None
                else {
                    "id": step.id,
                    "kind": step.kind,
                    "status": step.status,
                    "attempts": step.attempts,
                    "next_attempt_at": _when(step.run_after),
                    "give_up_at": _when(step.give_up_at),
                    "last_error": step.last_error,
                },
                "history": [
                    {
                        "at": _when(h.created_at),
                        "from": h.from_state,
                        "to": h.to_state,
                        "event": h.event,
                        "actor": h.actor,
                        "reason": h.reason,
                    }
                    for h in history
                ],
            }

    typer.echo(json.dumps(_with_runtime(work), indent=2))


@runs_cli.command("retry")
def retry_run(blocked_run_id: Annotated[str, typer.Argument(metavar="ID")], as_: As = None) -> None:
    """Start a failed run over (the API's retry), as an operator."""
    from app import operator_views
    from app.blocked_runs import service

    run_id = _uuid(blocked_run_id, "ID")
    actor = _operator(as_)

    async def work(rt: Any) -> str:
        async with rt.db.sessions() as session:
            account_id = (await operator_views.run(session, run_id)).account_id
        await service.retry(rt, account_id, run_id, actor)
        async with rt.db.sessions() as session:
            return str((await operator_views.run(session, run_id)).state)

    typer.echo(f"{run_id} retried by {actor}; now {_with_runtime(work)}")


@runs_cli.command("cancel")
def cancel_run(
    blocked_run_id: Annotated[str, typer.Argument(metavar="ID")], as_: As = None
) -> None:
    """Stop handling a run (the API's cancel), as an operator."""
    from app import operator_views
    from app.blocked_runs import service

    run_id = _uuid(blocked_run_id, "ID")
    actor = _operator(as_)

    async def work(rt: Any) -> None:
        async with rt.db.sessions() as session:
            account_id = (await operator_views.run(session, run_id)).account_id
        await service.cancel(rt, account_id, run_id, actor)

    _with_runtime(work)
    typer.echo(f"{run_id} cancelled by {actor}")


@webhooks_cli.command("replay")
def replay_webhook(
    event_id: Annotated[int, typer.Argument(metavar="EVENT_ID")], as_: As = None
) -> None:
    """Act on a stored Mosaic webhook again, as if it had just arrived."""
    from app.webhooks.service import replay

    actor = _operator(as_)

    async def work(rt: Any) -> str:
        return str((await replay(rt, event_id, actor)).value)

    typer.echo(f"webhook event {event_id} replayed by {actor}: {_with_runtime(work)}")


@deliveries_cli.command("list")
def list_deliveries(
    subscription: Annotated[str | None, typer.Option(help="Only this subscription's.")] = None,
    account: Annotated[str | None, typer.Option(help="Only this account's.")] = None,
    status: Annotated[str | None, typer.Option(help="pending, delivered or failed.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000)] = 50,
) -> None:
    """The delivery log, newest first, with each delivery's last answer."""
    from app.subscriptions import service

    subscription_id = _uuid(subscription, "--subscription") if subscription else None
    account_id = _uuid(account, "--account") if account else None

    async def work(rt: Any) -> list[str]:
        found = await service.deliveries(
            rt, account_id, subscription_id=subscription_id, status=status, limit=limit
        )
        lines = ["id\tsubscription\tevent\tstatus\tattempts\tlast_status\tlast_error\tcreated"]
        lines += [
            "\t".join(
                [
                    str(d.id),
                    str(d.subscription_id),
                    d.event_type,
                    d.status,
                    str(d.attempts),
                    str(d.last_status_code or "-"),
                    _one_line(d.last_error),
                    _when(d.created_at),
                ]
            )
            for d in found
        ]
        return lines

    typer.echo("\n".join(_with_runtime(work)))


@deliveries_cli.command("redeliver")
def redeliver(delivery_id: Annotated[int, typer.Argument(metavar="ID")]) -> None:
    """Send a delivered or failed notification again (same webhook-id)."""
    from app.subscriptions import service

    async def work(rt: Any) -> int:
        return int((await service.redeliver(rt, None, delivery_id)).id)

    typer.echo(f"delivery {delivery_id} queued again as delivery {_with_runtime(work)}")


@subscriptions_cli.command("list")
def list_subscriptions(
    account: Annotated[str | None, typer.Option(help="Only this account's.")] = None,
) -> None:
    """Subscriptions: id, account, status (and why disabled), url, event types."""
    from app.subscriptions import service

    account_id = _uuid(account, "--account") if account else None

    async def work(rt: Any) -> list[str]:
        found = await service.list_subscriptions(rt, account_id)
        lines = ["id\taccount\tstatus\turl\tevents\tdisabled_reason"]
        lines += [
            "\t".join(
                [
                    str(s.id),
                    str(s.account_id),
                    s.status,
                    s.url,
                    ",".join(s.event_types),
                    _one_line(s.disabled_reason),
                ]
            )
            for s in found
        ]
        return lines

    typer.echo("\n".join(_with_runtime(work)))


@subscriptions_cli.command("enable")
def enable_subscription(subscription_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """Enable a disabled subscription; what still waits is retried now."""
    from app.subscriptions import service

    sid = _uuid(subscription_id, "ID")

    async def work(rt: Any) -> str:
        return str((await service.enable(rt, None, sid)).status)

    typer.echo(f"subscription {sid} {_with_runtime(work)}")
