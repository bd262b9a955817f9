"""Accounts over HTTP: what comes in, and what goes out (never the Mosaic key)."""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, WithJsonSchema, field_validator

from app.input_text import StorableStr, storable
from app.secret_policy import WEBHOOK_SECRET_MIN_BITS, WEBHOOK_SECRET_MIN_LENGTH, weakness

# One definition of "no surrounding spaces", in a form Python and ECMA regexes (the document's
# `pattern`) read alike, so what the document allows is exactly what the validator accepts.
_SECRET_PATTERN = r"^[^ \t\n\r\f\v]([\s\S]*[^ \t\n\r\f\v])?$"
_SECRET_SHAPE: dict[str, Any] = {"minLength": 1, "maxLength": 500, "pattern": _SECRET_PATTERN}


class AccountCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: StorableStr = Field(min_length=1, max_length=200)
    mosaic_api_key: SecretStr = Field(
        description="The organization's Mosaic key (mk_…).", json_schema_extra=_SECRET_SHAPE
    )
    webhook_secret: SecretStr | None = Field(
        default=None,
        description="The secret Mosaic sends in X-Mosaic-Signature; generated when omitted.",
        json_schema_extra=_SECRET_SHAPE,
    )

    @field_validator("mosaic_api_key", "webhook_secret")
    @classmethod
    def _no_blank_secrets(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            raw = storable(value.get_secret_value())
            if len(raw) > 500 or not re.fullmatch(_SECRET_PATTERN, raw):
                raise ValueError("must be a non-empty string without surrounding spaces")
        return value

    @field_validator("webhook_secret")
    @classmethod
    def _strong_webhook_secret(cls, value: SecretStr | None) -> SecretStr | None:
        # Anyone who guesses it can open blocked runs for the account; leave it out to get one.
        if value is not None and (
            reason := weakness(
                value.get_secret_value(),
                min_length=WEBHOOK_SECRET_MIN_LENGTH,
                min_bits=WEBHOOK_SECRET_MIN_BITS,
            )
        ):
            raise ValueError(reason)
        return value


MAX_CAP_USD = Decimal("1000000")


class AccountUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # A number in the document (not Decimal's number-or-string), so every value the document
    # allows is taken; kept to the cent.
    monthly_topup_cap_usd: (
        Annotated[
            Decimal,
            WithJsonSchema({"type": "number", "minimum": 0, "maximum": int(MAX_CAP_USD)}),
        ]
        | None
    ) = Field(
        default=None,
        ge=0,
        le=MAX_CAP_USD,
        description="At most this much auto top-up spend in a worst-case month (USD, kept to "
        "the cent); null: no cap; omitted: unchanged. Settings that could cost more are "
        "refused (`topup_over_spend_cap`).",
    )

    @field_validator("monthly_topup_cap_usd")
    @classmethod
    def _to_the_cent(cls, value: Decimal | None) -> Decimal | None:
        return None if value is None else value.quantize(Decimal("0.01"), ROUND_HALF_UP)


class AccountOut(BaseModel):
    id: uuid.UUID
    name: str
    webhook_url: str
    monthly_topup_cap_usd: Decimal | None = None
    created_at: datetime


class AccountCreated(AccountOut):
    webhook_secret: str | None = Field(
        default=None, description="Only when generated, and only in this answer."
    )
