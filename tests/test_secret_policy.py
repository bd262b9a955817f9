"""Production refuses weak, published and placeholder secrets, however they are spaced."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from typing import Any

import pytest
from cryptography.fernet import Fernet
from pydantic import ValidationError

from app.settings import DEV_ENCRYPTION_KEY, DEV_JWT_SECRET, Environment, Settings

STRONG_JWT_SECRET = secrets.token_urlsafe(48)
FRESH_KEY = Fernet.generate_key().decode()


def production(**values: Any) -> Settings:
    base: dict[str, Any] = {
        "env": Environment.PRODUCTION,
        "jwt_secret": STRONG_JWT_SECRET,
        "encryption_key": FRESH_KEY,
    }
    return Settings(**(base | values))


def test_strong_fresh_secrets_are_accepted() -> None:
    settings = production(encryption_key=f"{FRESH_KEY}, {Fernet.generate_key().decode()}")
    assert settings.jwt_secret is not None
    assert len(settings.encryption_keys) == 2


@pytest.mark.parametrize(
    "key",
    [
        DEV_ENCRYPTION_KEY,
        DEV_ENCRYPTION_KEY + " ",
        DEV_ENCRYPTION_KEY + "\n",
        " " + DEV_ENCRYPTION_KEY,
        f"{FRESH_KEY}, {DEV_ENCRYPTION_KEY}",
        f"{FRESH_KEY},\n{DEV_ENCRYPTION_KEY}\n",
        "CHANGE-ME-fernet-key",
    ],
    ids=["exact", "trailing space", "newline", "leading space", "after ', '", "lines", "deploy"],
)
def test_the_published_encryption_key_is_refused_however_it_is_spaced(key: str) -> None:
    with pytest.raises(ValidationError, match="UNBLOCK_ENCRYPTION_KEY"):
        production(encryption_key=key)


@pytest.mark.parametrize(
    "secret",
    [
        "a",
        "secret",
        DEV_JWT_SECRET,
        DEV_JWT_SECRET + "\n",
        "CHANGE-ME-generate-a-long-random-secret",
        " CHANGE-ME-generate-a-long-random-secret ",
        "x" * 64,
        "abababababababababababababababababababab",
        "my-changeme-but-otherwise-long-and-varied-secret-value",
    ],
    ids=[
        "a",
        "secret",
        "dev",
        "dev+newline",
        "deploy placeholder",
        "placeholder spaced",
        "one character",
        "two characters",
        "placeholder word",
    ],
)
def test_a_weak_or_published_jwt_secret_is_refused_outside_dev(secret: str) -> None:
    with pytest.raises(ValidationError, match="UNBLOCK_JWT_SECRET"):
        production(jwt_secret=secret)


def test_dev_keeps_its_demo_secrets() -> None:
    settings = Settings(
        env=Environment.DEV, jwt_secret=DEV_JWT_SECRET, encryption_key=DEV_ENCRYPTION_KEY
    )
    assert settings.encryption_keys == [DEV_ENCRYPTION_KEY]


def test_jwks_needs_an_audience() -> None:
    with pytest.raises(ValidationError, match="UNBLOCK_JWT_AUDIENCE"):
        production(jwt_secret=None, jwks_url="https://idp.test/jwks.json")
    assert production(jwt_secret=None, jwks_url="https://idp.test/.jwks", jwt_audience="unblock")


def test_a_refused_secret_is_one_clear_line_and_never_echoed() -> None:
    weak = "secret"
    env = os.environ | {
        "UNBLOCK_ENV": "production",
        "UNBLOCK_JWT_SECRET": weak,
        "UNBLOCK_ENCRYPTION_KEY": FRESH_KEY,
        "DATABASE_URL": "postgresql://x@127.0.0.1:1/x",
    }
    # `migrate` needs the database only; the worker reads every secret.
    done = subprocess.run(
        [sys.executable, "-m", "app", "worker"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "UNBLOCK_JWT_SECRET" in lines[0]
    assert f"'{weak}'" not in done.stderr
    assert FRESH_KEY not in done.stderr
