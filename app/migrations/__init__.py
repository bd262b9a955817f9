"""Alembic, driven from code: `unblock migrate`, `unblock dev` and the tests use this."""

from __future__ import annotations

import threading
from pathlib import Path

from alembic import command
from alembic.config import Config

# The Alembic scripts ship inside the package, so an installed wheel can migrate.
MIGRATIONS_DIR = Path(__file__).resolve().parent


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["database_url"] = database_url
    return config


def _in_thread(fn: object, *args: object) -> None:
    # env.py runs its own event loop; a thread keeps it clear of any loop the caller runs.
    errors: list[BaseException] = []

    def target() -> None:
        try:
            fn(*args)  # type: ignore[operator]
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, name="alembic")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


def upgrade(database_url: str, revision: str = "head") -> None:
    _in_thread(command.upgrade, alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str) -> None:
    _in_thread(command.downgrade, alembic_config(database_url), revision)
