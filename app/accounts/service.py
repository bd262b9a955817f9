"""Creating and reading accounts."""

from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.accounts.models import Account
from app.accounts.schemas import AccountCreate, AccountCreated, AccountOut, AccountUpdate
from app.accounts.secrets import Keyring, generate_webhook_secret, hash_webhook_secret
from app.errors import NotFound


def webhook_url(public_url: str, account_id: uuid.UUID) -> str:
    return f"{public_url}/v1/webhooks/mosaic/{account_id}"


def to_out(account: Account, public_url: str) -> AccountOut:
    return AccountOut(
        id=account.id,
        name=account.name,
        webhook_url=webhook_url(public_url, account.id),
        monthly_topup_cap_usd=account.monthly_topup_cap_usd,
        created_at=account.created_at,
    )


async def create(
    session: AsyncSession, keyring: Keyring, body: AccountCreate, public_url: str
) -> AccountCreated:
    """Store the account with its Mosaic key encrypted; a generated secret is shown once."""
    generated = None if body.webhook_secret else generate_webhook_secret()
    secret = generated or body.webhook_secret.get_secret_value()  # type: ignore[union-attr]
    account = Account(
        name=body.name,
        mosaic_api_key_encrypted=keyring.encrypt(body.mosaic_api_key.get_secret_value()),
        webhook_secret_hash=hash_webhook_secret(secret),
    )
    session.add(account)
    await session.flush()
    await session.refresh(account)
    return AccountCreated(**to_out(account, public_url).model_dump(), webhook_secret=generated)


async def get(session: AsyncSession, account_id: uuid.UUID) -> Account:
    account = await session.get(Account, account_id)
    if account is None:
        raise NotFound("No such account.", code="account_not_found")
    return account


async def update(session: AsyncSession, account_id: uuid.UUID, body: AccountUpdate) -> Account:
    """Change what an admin may change: the monthly cap on auto top-up spend."""
    account = await session.get(Account, account_id, with_for_update={"key_share": True})
    if account is None:
        raise NotFound("No such account.", code="account_not_found")
    if "monthly_topup_cap_usd" in body.model_fields_set:
        account.monthly_topup_cap_usd = body.monthly_topup_cap_usd
    await session.flush()
    await session.refresh(account)
    return account


async def reencrypt_keys(session: AsyncSession, keyring: Keyring) -> int:
    """Re-encrypt every stored Mosaic key under the keyring's newest key (after a rotation)."""
    accounts = (await session.execute(select(Account).with_for_update())).scalars().all()
    for account in accounts:
        account.mosaic_api_key_encrypted = keyring.rotate(account.mosaic_api_key_encrypted)
    await session.flush()
    return len(accounts)
