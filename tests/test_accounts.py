"""Accounts: creation over HTTP and from the CLI, secrets at rest, and key rotation."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.fernet import Fernet
from sqlalchemy import text

from app.accounts.secrets import Keyring
from conftest import ADMIN, ENCRYPTION_KEY, JWT_SECRET, Service, make_tenant

pytestmark = pytest.mark.asyncio(loop_scope="session")

UNBLOCK = Path(sys.executable).with_name("unblock")


def mosaic_key() -> str:
    return f"mk_{uuid.uuid4().hex}{uuid.uuid4().hex}"


async def create(client: httpx.AsyncClient, **body: Any) -> httpx.Response:
    return await client.post("/v1/accounts", json={"name": "Acme"} | body, headers=ADMIN)


async def stored_account(service: Service, account_id: str) -> dict[str, Any]:
    async with service.runtime.db.sessions() as session:
        row = (
            await session.execute(
                text("SELECT * FROM accounts WHERE id = :id"), {"id": uuid.UUID(account_id)}
            )
        ).one()
    return dict(row._mapping)


async def signed_ping(client: httpx.AsyncClient, account_id: str, secret: str) -> httpx.Response:
    """A harmless event (ignored once authenticated) that proves which secret the account has."""
    return await client.post(
        f"/v1/webhooks/mosaic/{account_id}",
        json={"flag": "TEST", "run_id": f"ping-{uuid.uuid4()}"},
        headers={"X-Mosaic-Signature": secret},
    )


# --- POST /v1/accounts ------------------------------------------------------------------------


async def test_creating_an_account_returns_it_with_a_generated_secret_shown_once(
    client: httpx.AsyncClient, service: Service
) -> None:
    key = mosaic_key()
    answer = await create(client, name="Acme Video", mosaic_api_key=key)
    assert answer.status_code == 201, answer.text
    assert answer.headers["content-type"].startswith("application/json")
    body = answer.json()
    assert set(body) == {"id", "name", "webhook_url", "created_at", "webhook_secret"}
    account_id = str(uuid.UUID(body["id"]))
    assert body["name"] == "Acme Video"
    assert body["webhook_url"] == f"{service.url}/v1/webhooks/mosaic/{account_id}"
    assert datetime.fromisoformat(body["created_at"]).tzinfo is not None
    secret = body["webhook_secret"]
    assert secret.startswith("whsec_")
    assert len(secret) >= 32
    assert key not in answer.text

    read = await client.get(f"/v1/accounts/{account_id}", headers=ADMIN)
    assert read.status_code == 200
    expected = {k: v for k, v in body.items() if k != "webhook_secret"}
    assert read.json() == expected | {"monthly_topup_cap_usd": None}
    assert key not in read.text
    assert secret not in read.text

    # The generated secret is the one the webhook endpoint now checks.
    assert (await signed_ping(client, account_id, secret)).json() == {"status": "ignored"}
    assert (await signed_ping(client, account_id, secret + "x")).status_code == 401

    another = (await create(client, mosaic_api_key=mosaic_key())).json()
    assert another["webhook_secret"] != secret


async def test_a_supplied_webhook_secret_is_never_echoed(
    client: httpx.AsyncClient, service: Service
) -> None:
    key, secret = mosaic_key(), f"whsec_{uuid.uuid4().hex}"
    answer = await create(client, mosaic_api_key=key, webhook_secret=secret)
    assert answer.status_code == 201, answer.text
    assert "webhook_secret" not in answer.json()
    assert secret not in answer.text
    assert key not in answer.text
    account_id = answer.json()["id"]
    assert (await signed_ping(client, account_id, secret)).status_code == 202


async def test_secrets_are_stored_encrypted_and_hashed(
    client: httpx.AsyncClient, service: Service
) -> None:
    key, secret = mosaic_key(), f"whsec_{uuid.uuid4().hex}"
    account_id = (await create(client, mosaic_api_key=key, webhook_secret=secret)).json()["id"]
    row = await stored_account(service, account_id)

    encrypted = row["mosaic_api_key_encrypted"]
    assert encrypted != key
    assert key not in encrypted
    assert Keyring([ENCRYPTION_KEY]).decrypt(encrypted) == key
    with pytest.raises(ValueError, match="cannot be decrypted"):
        Keyring([Fernet.generate_key().decode()]).decrypt(encrypted)

    assert row["webhook_secret_hash"] == hashlib.sha256(secret.encode()).hexdigest()
    # Neither secret appears in clear anywhere in the row.
    flat = json.dumps(row, default=str)
    assert key not in flat
    assert secret not in flat


async def test_a_generated_secret_is_stored_only_as_its_hash(
    client: httpx.AsyncClient, service: Service
) -> None:
    body = (await create(client, mosaic_api_key=mosaic_key())).json()
    row = await stored_account(service, body["id"])
    assert row["webhook_secret_hash"] == hashlib.sha256(body["webhook_secret"].encode()).hexdigest()
    assert body["webhook_secret"] not in json.dumps(row, default=str)


@pytest.mark.parametrize(
    "body",
    [
        {"mosaic_api_key": "mk_x"},
        {"name": "", "mosaic_api_key": "mk_x"},
        {"name": "x" * 201, "mosaic_api_key": "mk_x"},
        {"name": "Acme"},
        {"name": "Acme", "mosaic_api_key": ""},
        {"name": "Acme", "mosaic_api_key": "   "},
        {"name": "Acme", "mosaic_api_key": " mk_x "},
        {"name": "Acme", "mosaic_api_key": 12345},
        {"name": "Acme", "mosaic_api_key": "mk_x", "webhook_secret": ""},
        {"name": "Acme", "mosaic_api_key": "mk_x", "plan": "creator"},
        {"name": ["Acme"], "mosaic_api_key": "mk_x"},
        ["Acme", "mk_x"],
    ],
    ids=[
        "missing name",
        "empty name",
        "long name",
        "missing key",
        "empty key",
        "blank key",
        "padded key",
        "numeric key",
        "empty secret",
        "unknown field",
        "list name",
        "not an object",
    ],
)
async def test_bad_account_input_is_422_problem_json(
    client: httpx.AsyncClient, body: Any, service: Service
) -> None:
    async with service.runtime.db.sessions() as session:
        before = await session.scalar(text("SELECT count(*) FROM accounts"))
    answer = await client.post("/v1/accounts", json=body, headers=ADMIN)
    assert answer.status_code == 422, answer.text
    assert answer.headers["content-type"].startswith("application/problem+json")
    problem = answer.json()
    assert problem["status"] == 422
    assert problem["code"] == "validation_error"
    assert {"type", "title", "detail", "errors"} <= problem.keys()
    assert "mk_x" not in answer.text  # a refused key is not echoed back either
    async with service.runtime.db.sessions() as session:
        after = await session.scalar(text("SELECT count(*) FROM accounts"))
    assert after == before


@pytest.mark.parametrize(
    ("content", "content_type"),
    [
        (b"{not json", "application/json"),
        (b"", "application/json"),
        (b"name=Acme&mosaic_api_key=mk_x", "application/x-www-form-urlencoded"),
    ],
)
async def test_a_body_that_is_not_json_is_422_problem_json(
    client: httpx.AsyncClient, content: bytes, content_type: str
) -> None:
    answer = await client.post(
        "/v1/accounts", content=content, headers=ADMIN | {"Content-Type": content_type}
    )
    assert answer.status_code == 422, answer.text
    assert answer.headers["content-type"].startswith("application/problem+json")
    assert answer.json()["status"] == 422


async def test_an_unknown_account_is_404_for_an_admin(client: httpx.AsyncClient) -> None:
    answer = await client.get(f"/v1/accounts/{uuid.uuid4()}", headers=ADMIN)
    assert answer.status_code == 404
    assert answer.headers["content-type"].startswith("application/problem+json")
    assert answer.json()["code"] == "account_not_found"
    malformed = await client.get("/v1/accounts/not-a-uuid", headers=ADMIN)
    assert malformed.status_code == 422


# --- Keyring ----------------------------------------------------------------------------------


async def test_a_keyring_decrypts_with_an_old_key_and_rotates_to_the_new_one() -> None:
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    before = Keyring([old]).encrypt("mk_secret")
    ring = Keyring([new, old])
    assert ring.decrypt(before) == "mk_secret"

    rotated = ring.rotate(before)
    assert rotated != before
    assert Keyring([new]).decrypt(rotated) == "mk_secret"
    with pytest.raises(ValueError, match="cannot be decrypted"):
        Keyring([old]).decrypt(rotated)
    # Fresh encryptions use the first key.
    assert Keyring([new]).decrypt(ring.encrypt("mk_other")) == "mk_other"


@pytest.mark.parametrize(
    "keys",
    [
        ["not-a-fernet-key"],
        [Fernet.generate_key().decode(), "short"],
        ["ZGV2"],
        [""],
    ],
)
async def test_a_keyring_with_a_malformed_key_explains_itself(keys: list[str]) -> None:
    with pytest.raises(ValueError, match="UNBLOCK_ENCRYPTION_KEY must be Fernet keys"):
        Keyring(keys)


async def test_an_empty_keyring_is_refused() -> None:
    with pytest.raises(ValueError, match="UNBLOCK_ENCRYPTION_KEY"):
        Keyring([])


async def test_a_tampered_ciphertext_is_refused() -> None:
    ring = Keyring([Fernet.generate_key().decode()])
    token = ring.encrypt("mk_secret")
    with pytest.raises(ValueError, match="cannot be decrypted"):
        ring.decrypt(token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB"))


# --- The CLI ----------------------------------------------------------------------------------


async def run_cli(database_url: str, service: Service, *args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNBLOCK_")}
    env |= {
        "DATABASE_URL": database_url,
        "UNBLOCK_ENV": "test",
        "UNBLOCK_JWT_SECRET": JWT_SECRET,
        "UNBLOCK_ENCRYPTION_KEY": ENCRYPTION_KEY,
        "UNBLOCK_PUBLIC_URL": service.url,
    }
    env.pop("MOSAIC_API_KEY", None)
    proc = await asyncio.create_subprocess_exec(
        str(UNBLOCK),
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_creates_an_account_the_api_can_read(
    client: httpx.AsyncClient, service: Service, database_url: str
) -> None:
    key = mosaic_key()
    code, out, err = await run_cli(
        database_url, service, "accounts", "create", "--name", "From CLI", "--mosaic-api-key", key
    )
    assert code == 0, err
    assert key not in out
    assert key not in err
    printed = json.loads(out)
    assert set(printed) == {"id", "name", "webhook_url", "created_at", "webhook_secret"}
    assert printed["name"] == "From CLI"
    assert printed["webhook_secret"].startswith("whsec_")
    assert printed["webhook_url"] == f"{service.url}/v1/webhooks/mosaic/{printed['id']}"

    read = await client.get(f"/v1/accounts/{printed['id']}", headers=ADMIN)
    assert read.status_code == 200, read.text
    assert read.json()["name"] == "From CLI"
    row = await stored_account(service, printed["id"])
    assert service.runtime.keyring.decrypt(row["mosaic_api_key_encrypted"]) == key
    signed = await signed_ping(client, printed["id"], printed["webhook_secret"])
    assert signed.status_code == 202


async def test_cli_with_a_supplied_secret_prints_no_secret(
    client: httpx.AsyncClient, service: Service, database_url: str
) -> None:
    secret = f"whsec_{uuid.uuid4().hex}"
    code, out, err = await run_cli(
        database_url,
        service,
        "accounts",
        "create",
        "--name",
        "Supplied",
        "--mosaic-api-key",
        mosaic_key(),
        "--webhook-secret",
        secret,
    )
    assert code == 0, err
    printed = json.loads(out)
    assert "webhook_secret" not in printed
    assert secret not in out
    assert (await signed_ping(client, printed["id"], secret)).status_code == 202


async def test_cli_refuses_bad_input_without_printing_the_key(
    service: Service, database_url: str
) -> None:
    key = mosaic_key()
    code, out, err = await run_cli(
        database_url, service, "accounts", "create", "--name", "", "--mosaic-api-key", key
    )
    assert code != 0
    assert key not in out + err


async def test_cli_token_is_accepted_by_the_service(
    client: httpx.AsyncClient, mosaic: httpx.AsyncClient, service: Service, database_url: str
) -> None:
    tenant = await make_tenant(client, mosaic)
    code, out, err = await run_cli(
        database_url,
        service,
        "token",
        "--account-id",
        tenant.account_id,
        "--scope",
        "runs:read",
        "--sub",
        "cli-user",
    )
    assert code == 0, err
    token = out.strip()
    claims = jwt.decode(token, JWT_SECRET, algorithms=["HS256"])
    assert claims["account_id"] == tenant.account_id
    assert claims["scope"] == "runs:read"
    assert claims["sub"] == "cli-user"

    headers = {"Authorization": f"Bearer {token}"}
    listed = await client.get("/v1/blocked-runs", headers=headers)
    assert listed.status_code == 200, listed.text
    assert listed.json() == {"items": [], "next_cursor": None}
    own = await client.get(f"/v1/accounts/{tenant.account_id}", headers=headers)
    assert own.status_code == 200
    # Only the scope asked for.
    write = await client.post(f"/v1/blocked-runs/{uuid.uuid4()}/cancel", headers=headers)
    assert write.status_code == 403
    assert write.json()["code"] == "missing_scope"
