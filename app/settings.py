"""The one settings class: every knob of the service, read from the environment."""

from __future__ import annotations

import ipaddress
import re
from datetime import timedelta
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from cryptography.fernet import Fernet
from pydantic import (
    AliasChoices,
    BeforeValidator,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from app import secret_policy
from app.secret_policy import DEV_ENCRYPTION_KEY as DEV_ENCRYPTION_KEY
from app.secret_policy import DEV_JWT_SECRET as DEV_JWT_SECRET

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")


def _duration(value: Any) -> Any:
    """Durations in the environment: `30` or `30s`, `500ms`, `5m`, `1h`, `7d` (ISO 8601 too)."""
    if isinstance(value, str) and (match := _DURATION.match(value)):
        return timedelta(seconds=float(match[1]) * _UNITS[match[2] or "s"])
    return value


Duration = Annotated[timedelta, BeforeValidator(_duration)]


class Environment(StrEnum):
    DEV = "dev"
    TEST = "test"
    PRODUCTION = "production"


class LogFormat(StrEnum):
    CONSOLE = "console"
    JSON = "json"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="UNBLOCK_", extra="ignore", populate_by_name=True)

    env: Environment = Environment.PRODUCTION
    database_url: str | None = Field(
        default=None, validation_alias=AliasChoices("DATABASE_URL", "UNBLOCK_DATABASE_URL")
    )
    data_dir: Path = Path(".unblock")
    public_url: str = "http://127.0.0.1:8000"
    mosaic_base_url: str = Field(
        default="https://api.mosaic.so",
        validation_alias=AliasChoices("MOSAIC_BASE_URL", "UNBLOCK_MOSAIC_BASE_URL"),
    )
    mosaic_timeout: Duration = timedelta(seconds=10)
    mosaic_connect_timeout: Duration = timedelta(seconds=3)

    jwt_secret: SecretStr | None = None
    jwks_url: str | None = None
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    # Fernet keys, comma-separated; the first encrypts, all decrypt (rotation).
    encryption_key: SecretStr | None = None

    run_worker: bool = True
    worker_concurrency: int = Field(default=8, ge=1, le=256)
    job_lease: Duration = timedelta(seconds=30)
    poll_interval: Duration = timedelta(seconds=1)
    retry_base: Duration = timedelta(milliseconds=500)
    retry_max: Duration = timedelta(seconds=60)
    give_up_after: Duration = timedelta(hours=1)
    action_deadline: Duration = timedelta(seconds=2)
    decision_ttl: Duration = timedelta(days=7)
    # A block reported this soon after the organization's answer is served by that answer.
    decision_grace: Duration = timedelta(minutes=2)
    # While a checkout is open: first re-read of GET /plan, doubling up to the cap; give up on
    # the checkout (back to a choice) after the TTL.
    checkout_poll: Duration = timedelta(seconds=10)
    checkout_poll_max: Duration = timedelta(minutes=5)
    checkout_ttl: Duration = timedelta(hours=24)
    max_resumes: int = Field(default=3, ge=1)
    # Resumes older than this no longer count toward max_resumes ("blocks again right after").
    resume_window: Duration = timedelta(hours=1)
    webhook_retention: Duration = timedelta(days=7)
    log_level: str = Field(default="INFO", pattern=r"(?i)^(debug|info|warning|error|critical)$")
    # Outbound notifications to subscribers (app/subscriptions): each attempt's timeout, the
    # backoff between attempts, how long a delivery is retried before its subscription is
    # disabled, and CIDRs a subscription may resolve into although not public (loopback, …).
    notify_timeout: Duration = timedelta(seconds=10)
    notify_retry_base: Duration = timedelta(seconds=1)
    notify_retry_max: Duration = timedelta(minutes=10)
    notify_give_up_after: Duration = timedelta(hours=24)
    notify_allowed_networks: str = ""
    # Where the hosted checkout sends the person back: by default the reference web app, which
    # confirms on return (a paid checkout moves on without a click). Empty: pass none.
    checkout_success_url: str | None = None
    checkout_cancel_url: str | None = None

    # Operations: logs, start-up, upkeep, the connection pool, browsers on other origins.
    log_format: LogFormat = LogFormat.CONSOLE
    # How long serve/worker/migrate wait for an unreachable (or restarting) database at start.
    database_wait: Duration = timedelta(minutes=5)
    db_pool_size: int = Field(default=10, ge=1, le=1000)
    db_max_overflow: int = Field(default=10, ge=0, le=1000)
    maintenance_interval: Duration = timedelta(seconds=30)
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [origin.strip().rstrip("/") for origin in value.split(",") if origin.strip()]
        return value

    @field_validator("database_url")
    @classmethod
    def _postgres_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        try:
            backend = make_url(value).get_backend_name()
        except ArgumentError:
            raise ValueError("is not a URL (postgresql://user:password@host:5432/dbname)") from None
        if backend not in {"postgres", "postgresql"}:
            raise ValueError(f"must be a postgresql:// URL, not {backend}://")
        return value

    @field_validator("encryption_key")
    @classmethod
    def _fernet_keys(cls, value: SecretStr | None) -> SecretStr | None:
        keys = [k.strip() for k in value.get_secret_value().split(",")] if value else []
        for n, key in enumerate(k for k in keys if k):
            try:
                Fernet(key)
            except ValueError:
                raise ValueError(
                    f"UNBLOCK_ENCRYPTION_KEY: key {n + 1} is not a Fernet key "
                    "(32 url-safe base64-encoded bytes; "
                    "make one with `python -c 'from cryptography.fernet import Fernet; "
                    "print(Fernet.generate_key().decode())'`)"
                ) from None
        return value

    @field_validator("public_url", "mosaic_base_url")
    @classmethod
    def _strip_trailing_slash(cls, value: str) -> str:
        return value.rstrip("/")

    @field_validator("notify_allowed_networks")
    @classmethod
    def _cidrs(cls, value: str) -> str:
        for part in filter(None, (p.strip() for p in value.split(","))):
            ipaddress.ip_network(part, strict=False)  # a ValueError names the bad one
        return value

    @model_validator(mode="after")
    def _checkout_returns_to_the_app(self) -> Settings:
        if self.checkout_success_url is None:
            self.checkout_success_url = f"{self.public_url}/app?checkout=paid"
        if self.checkout_cancel_url is None:
            self.checkout_cancel_url = f"{self.public_url}/app?checkout=cancelled"
        self.checkout_success_url = self.checkout_success_url or None
        self.checkout_cancel_url = self.checkout_cancel_url or None
        return self

    @model_validator(mode="after")
    def _refuse_placeholders_outside_dev(self) -> Settings:
        if self.env is Environment.DEV:
            return self
        secret = self.jwt_secret.get_secret_value() if self.jwt_secret else None
        key = self.encryption_key.get_secret_value() if self.encryption_key else None
        if key and secret_policy.published_among(key.split(",")):
            raise ValueError(
                "UNBLOCK_ENCRYPTION_KEY holds a published example key; generate one with "
                "Fernet.generate_key()"
            )
        if secret and (
            reason := secret_policy.weakness(
                secret,
                min_length=secret_policy.JWT_SECRET_MIN_LENGTH,
                min_bits=secret_policy.JWT_SECRET_MIN_BITS,
            )
        ):
            raise ValueError(f"UNBLOCK_JWT_SECRET {reason}")
        if not secret and not self.jwks_url:
            raise ValueError("set UNBLOCK_JWT_SECRET or UNBLOCK_JWKS_URL")
        if not key:
            raise ValueError("set UNBLOCK_ENCRYPTION_KEY (one or more Fernet keys)")
        return self

    @property
    def encryption_keys(self) -> list[str]:
        if self.encryption_key is None:
            return []
        return [k.strip() for k in self.encryption_key.get_secret_value().split(",") if k.strip()]

    # --- The edge: what one client may cost (docs/security.md) --------------------------------
    # Largest webhook body; every other route takes at most API_MAX_BODY (app/body_limit.py).
    max_webhook_body: int = Field(default=1_000_000, ge=1024, le=16_000_000)
    # Open connections per process before new requests are answered 503. Times the largest
    # body, it bounds what request bodies can hold in memory (200 × 1 MB under a 512 Mi pod).
    max_connections: int = Field(default=200, ge=1)
    # Proxies whose X-Forwarded-For names the client (the address failures are counted by).
    forwarded_allow_ips: str = "127.0.0.1"
    # Time a client has to send a request's headers, and an idle keep-alive connection's life.
    header_timeout: Duration = timedelta(seconds=10)
    keep_alive_timeout: Duration = timedelta(seconds=5)
    # Failed authentications allowed per minute per client address, and per webhook account.
    auth_failures_per_source: int = Field(default=30, ge=1)
    auth_failures_per_account: int = Field(default=120, ge=1)

    @model_validator(mode="after")
    def _audience_with_jwks(self) -> Settings:
        # A shared identity provider mints tokens for many services: only `aud` tells them apart.
        if self.jwks_url and not self.jwt_audience:
            raise ValueError(
                "UNBLOCK_JWKS_URL needs UNBLOCK_JWT_AUDIENCE (this service's audience)"
            )
        return self


class DatabaseSettings(Settings):
    """What `unblock migrate` reads: the database only, not the secrets it never uses."""

    @model_validator(mode="after")
    def _refuse_placeholders_outside_dev(self) -> DatabaseSettings:
        return self


def env_name(field: str) -> str:
    """The environment variable that sets a field (for messages to operators)."""
    if field not in Settings.model_fields:
        return field.upper()  # already a variable's name (an alias)
    alias = Settings.model_fields[field].validation_alias
    if isinstance(alias, AliasChoices) and isinstance(alias.choices[0], str):
        return alias.choices[0]
    return f"UNBLOCK_{field.upper()}"


@lru_cache
def get_settings() -> Settings:
    return Settings()
