"""Who may call what: bearer tokens, scopes, account isolation, and JWKS-verified keys."""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from app.auth import TokenVerifier
from app.errors import Unauthorized
from app.settings import Environment, Settings
from conftest import (
    ADMIN,
    ENCRYPTION_KEY,
    JWT_SECRET,
    Tenant,
    assert_problem,
    bearer,
    blocked_run_for,
    make_tenant,
    wait_for_state,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_made_token(header: dict[str, Any], claims: dict[str, Any], key: bytes | None) -> str:
    """A JWT assembled byte by byte (for algorithms PyJWT rightly refuses to produce)."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    signature = b"" if key is None else hmac.new(key, signing_input.encode(), "sha256").digest()
    return f"{signing_input}.{b64url(signature)}"


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {"sub": "someone", "exp": now + 600, "iat": now, "scope": "runs:read"}
    return {k: v for k, v in (base | overrides).items() if v is not None}


def hs256(**overrides: Any) -> str:
    return jwt.encode(claims(**overrides), JWT_SECRET, algorithm="HS256")


# --- Bearer tokens on the service -------------------------------------------------------------

BAD_TOKENS: dict[str, tuple[dict[str, str], str]] = {
    "no header": ({}, "missing_token"),
    "basic scheme": ({"Authorization": "Basic dXNlcjpwYXNz"}, "missing_token"),
    "token without scheme": ({"Authorization": hs256()}, "missing_token"),
    "bare bearer": ({"Authorization": "Bearer"}, "missing_token"),
    "not a jwt": (bearer("not-a-jwt"), "invalid_token"),
    "three garbage parts": (bearer("a.b.c"), "invalid_token"),
    "another secret": (
        bearer(jwt.encode(claims(), "another-secret-0123456789abcdef01234", algorithm="HS256")),
        "invalid_token",
    ),
    "expired": (bearer(hs256(exp=int(time.time()) - 60)), "token_expired"),
    "alg none": (
        bearer(hand_made_token({"alg": "none", "typ": "JWT"}, claims(), key=None)),
        "invalid_token",
    ),
    "alg none, signed anyway": (
        bearer(hand_made_token({"alg": "none", "typ": "JWT"}, claims(), key=JWT_SECRET.encode())),
        "invalid_token",
    ),
    "no exp": (bearer(jwt.encode(claims(exp=None), JWT_SECRET)), "invalid_token"),
    "no sub": (bearer(jwt.encode(claims(sub=None), JWT_SECRET)), "invalid_token"),
    "sub not a string": (bearer(hs256(sub=42)), "invalid_token"),
    "account_id not a uuid": (bearer(hs256(account_id="acct-1")), "invalid_token"),
    "scope not a string": (bearer(hs256(scope={"runs": "read"})), "invalid_token"),
    "tampered claims": (
        bearer(
            ".".join(
                [
                    hs256().split(".")[0],
                    b64url(json.dumps(claims(scope="accounts:admin")).encode()),
                    hs256().split(".")[2],
                ]
            )
        ),
        "invalid_token",
    ),
}


@pytest.mark.parametrize("case", list(BAD_TOKENS))
async def test_a_bad_or_missing_token_is_401_problem_json(
    client: httpx.AsyncClient, case: str
) -> None:
    headers, code = BAD_TOKENS[case]
    answer = await client.get("/v1/blocked-runs", headers=headers)
    assert_problem(answer, 401, code)
    assert answer.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/accounts"),
        ("GET", "/v1/accounts/{id}"),
        ("POST", "/v1/blocked-runs"),
        ("GET", "/v1/blocked-runs/{id}"),
        ("POST", "/v1/blocked-runs/{id}/cancel"),
        ("GET", "/v1/blocked-runs/{id}/events"),
    ],
)
async def test_every_authenticated_endpoint_refuses_an_expired_token(
    client: httpx.AsyncClient, method: str, path: str
) -> None:
    token = bearer(hs256(exp=int(time.time()) - 5, scope="runs:read runs:write accounts:admin"))
    answer = await client.request(method, path.format(id=uuid.uuid4()), headers=token, json={})
    assert_problem(answer, 401, "token_expired")


async def test_a_token_for_an_account_that_has_no_scope_reads_only_that_account(
    client: httpx.AsyncClient, mosaic: httpx.AsyncClient
) -> None:
    tenant = await make_tenant(client, mosaic)
    own = await client.get(f"/v1/accounts/{tenant.account_id}", headers=tenant.token())
    assert own.status_code == 200, own.text
    assert own.json()["id"] == tenant.account_id


# --- Scopes -------------------------------------------------------------------------------------

ALL_BUT = {
    scope: [s for s in ("runs:read", "runs:write", "runs:register", "accounts:admin") if s != scope]
    for scope in ("runs:read", "runs:write", "runs:register", "accounts:admin")
}

SCOPED_CALLS: list[tuple[str, str, str, dict[str, Any] | None]] = [
    ("runs:register", "POST", "/v1/blocked-runs", {"run_id": "run-x"}),
    ("runs:read", "GET", "/v1/blocked-runs", None),
    ("runs:read", "GET", "/v1/blocked-runs/{id}", None),
    ("runs:read", "GET", "/v1/blocked-runs/{id}/events", None),
    ("runs:write", "POST", "/v1/blocked-runs/{id}/choose-plan", {"plan_id": "creator"}),
    ("runs:write", "POST", "/v1/blocked-runs/{id}/confirm-checkout", None),
    ("runs:write", "POST", "/v1/blocked-runs/{id}/topup", {"enable": False}),
    ("runs:write", "POST", "/v1/blocked-runs/{id}/cancel", None),
    ("runs:write", "POST", "/v1/blocked-runs/{id}/retry", None),
    ("accounts:admin", "POST", "/v1/accounts", {"name": "x", "mosaic_api_key": "mk_x"}),
]


@pytest.mark.parametrize(
    ("scope", "method", "path", "body"),
    SCOPED_CALLS,
    ids=[f"{m} {p}" for _, m, p, _ in SCOPED_CALLS],
)
async def test_each_endpoint_needs_its_own_scope(
    client: httpx.AsyncClient,
    mosaic: httpx.AsyncClient,
    scope: str,
    method: str,
    path: str,
    body: dict[str, Any] | None,
) -> None:
    tenant = await make_tenant(client, mosaic)
    run_id = f"run-{uuid.uuid4()}"
    opened = await client.post(
        "/v1/blocked-runs", json={"run_id": run_id}, headers=tenant.service_headers
    )
    assert opened.status_code == 201, opened.text
    url = path.format(id=opened.json()["id"])
    # Every other scope together is still not enough.
    answer = await client.request(
        method, url, headers=tenant.token(*ALL_BUT[scope]), json=body if body else None
    )
    problem = assert_problem(answer, 403, "missing_scope")
    assert scope in problem["detail"]

    # With just that scope the same call gets past authorisation.
    allowed = tenant.token(scope)
    if path.endswith("/events"):
        async with client.stream("GET", url, headers=allowed) as stream:
            assert stream.status_code == 200
        return
    answer = await client.request(method, url, headers=allowed, json=body if body else None)
    assert answer.status_code not in (401, 403), answer.text


async def test_an_admin_token_without_account_id_has_no_runs_to_see(
    client: httpx.AsyncClient,
) -> None:
    admin = bearer(
        jwt.encode(
            claims(scope="accounts:admin runs:read runs:write runs:register"),
            JWT_SECRET,
            algorithm="HS256",
        )
    )
    listed = await client.get("/v1/blocked-runs", headers=admin)
    assert_problem(listed, 403, "no_account")
    registered = await client.post("/v1/blocked-runs", json={"run_id": "run-x"}, headers=admin)
    assert_problem(registered, 403, "no_account")
    read = await client.get(f"/v1/blocked-runs/{uuid.uuid4()}", headers=admin)
    assert_problem(read, 403, "no_account")


# --- Isolation between accounts ---------------------------------------------------------------


async def two_tenants_and_a_run_of_a(
    client: httpx.AsyncClient, mosaic: httpx.AsyncClient
) -> tuple[Tenant, Tenant, dict[str, Any]]:
    a = await make_tenant(client, mosaic)
    b = await make_tenant(client, mosaic)
    run_id = f"run-{uuid.uuid4()}"
    opened = await client.post(
        "/v1/blocked-runs", json={"run_id": run_id}, headers=a.service_headers
    )
    assert opened.status_code == 201, opened.text
    run = await wait_for_state(client, a, opened.json()["id"], "awaiting_choice")
    return a, b, run


async def test_another_accounts_blocked_run_is_unknown_to_every_call(
    client: httpx.AsyncClient, mosaic: httpx.AsyncClient
) -> None:
    a, b, run = await two_tenants_and_a_run_of_a(client, mosaic)
    base = f"/v1/blocked-runs/{run['id']}"
    b_all = b.token("runs:read", "runs:write", "runs:register")

    assert_problem(await client.get(base, headers=b_all), 404, "blocked_run_not_found")
    actions: list[tuple[str, dict[str, Any] | None]] = [
        ("choose-plan", {"plan_id": run["plans"][0]["id"]}),
        ("confirm-checkout", None),
        ("topup", {"enable": False}),
        ("cancel", None),
        ("retry", None),
    ]
    for action, body in actions:
        answer = await client.post(f"{base}/{action}", json=body, headers=b_all)
        assert_problem(answer, 404, "blocked_run_not_found")
    assert_problem(await client.get(f"{base}/events", headers=b_all), 404, "blocked_run_not_found")

    # None of it touched A's run.
    after = (await client.get(base, headers=a.headers)).json()
    assert after["state"] == "awaiting_choice"
    assert after["version"] == run["version"]
    assert after["chosen_plan_id"] is None
    assert [h["actor"] for h in after["history"]] == ["service:billing-svc", "system"]


async def test_another_accounts_runs_never_appear_in_a_list(
    client: httpx.AsyncClient, mosaic: httpx.AsyncClient
) -> None:
    a, b, run = await two_tenants_and_a_run_of_a(client, mosaic)
    assert (await blocked_run_for(client, a, run["run_id"]))["id"] == run["id"]

    everything = await client.get("/v1/blocked-runs", headers=b.headers)
    assert everything.status_code == 200
    assert everything.json() == {"items": [], "next_cursor": None}
    by_run_id = await client.get(
        "/v1/blocked-runs", params={"run_id": run["run_id"]}, headers=b.headers
    )
    assert by_run_id.json()["items"] == []
    by_state = await client.get(
        "/v1/blocked-runs", params={"state": "awaiting_choice"}, headers=b.headers
    )
    assert by_state.json()["items"] == []

    # B registering the same Mosaic run id opens B's own episode, not a view of A's.
    mine = await client.post(
        "/v1/blocked-runs", json={"run_id": run["run_id"]}, headers=b.service_headers
    )
    assert mine.status_code == 201
    assert mine.json()["id"] != run["id"]
    assert mine.json()["account_id"] == b.account_id


async def test_an_account_is_readable_by_itself_and_admins_only(
    client: httpx.AsyncClient, mosaic: httpx.AsyncClient
) -> None:
    a = await make_tenant(client, mosaic)
    b = await make_tenant(client, mosaic)
    own = await client.get(f"/v1/accounts/{a.account_id}", headers=a.headers)
    assert own.status_code == 200
    assert own.json()["id"] == a.account_id
    other = await client.get(f"/v1/accounts/{a.account_id}", headers=b.headers)
    assert_problem(other, 404, "account_not_found")
    # Even with every runs scope, B is not an admin.
    b_all = b.token("runs:read", "runs:write", "runs:register")
    assert_problem(
        await client.get(f"/v1/accounts/{a.account_id}", headers=b_all), 404, "account_not_found"
    )
    admin = await client.get(f"/v1/accounts/{a.account_id}", headers=ADMIN)
    assert admin.status_code == 200
    assert admin.json()["id"] == a.account_id
    # B cannot create accounts either.
    created = await client.post(
        "/v1/accounts", json={"name": "x", "mosaic_api_key": "mk_x"}, headers=b_all
    )
    assert_problem(created, 403, "missing_scope")


async def test_a_webhook_signed_with_another_accounts_secret_is_refused(
    client: httpx.AsyncClient, mosaic: httpx.AsyncClient
) -> None:
    a = await make_tenant(client, mosaic)
    b = await make_tenant(client, mosaic)
    run_id = f"run-{uuid.uuid4()}"
    event = {"flag": "RUN_FINISHED", "run_id": run_id, "status": "failed", "needs_credits": True}
    wrong = await client.post(
        f"/v1/webhooks/mosaic/{a.account_id}",
        json=event,
        headers={"X-Mosaic-Signature": b.webhook_secret},
    )
    assert_problem(wrong, 401, "bad_signature")
    for tenant in (a, b):
        listed = await client.get(
            "/v1/blocked-runs", params={"run_id": run_id}, headers=tenant.headers
        )
        assert listed.json()["items"] == []
    right = await client.post(
        f"/v1/webhooks/mosaic/{a.account_id}",
        json=event,
        headers={"X-Mosaic-Signature": a.webhook_secret},
    )
    assert right.status_code == 202
    assert right.json()["status"] == "accepted"


# --- Keys from a JWKS URL ---------------------------------------------------------------------


class JwksServer:
    """A JWKS document on loopback (PyJWKClient fetches it with urllib, off the event loop)."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.fetches = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.fetches += 1
                body = json.dumps({"keys": owner.keys}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/.well-known/jwks.json"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def publish(self, jwk: dict[str, Any]) -> None:
        self.keys.append(jwk)


@pytest.fixture
def jwks() -> Iterator[JwksServer]:
    server = JwksServer()
    server.thread.start()
    yield server
    server.server.shutdown()
    server.server.server_close()


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_jwk(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, kid: str) -> dict[str, Any]:
    algorithm = RSAAlgorithm if isinstance(key, rsa.RSAPrivateKey) else ECAlgorithm
    jwk: dict[str, Any] = json.loads(algorithm.to_jwk(key.public_key()))
    return jwk | {"kid": kid, "use": "sig"}


AUDIENCE = "unblock"


def aud_claims(**overrides: Any) -> dict[str, Any]:
    """Claims for a JWKS-verified token: an identity provider's tokens name their audience."""
    return claims(**({"aud": AUDIENCE} | overrides))


def jwks_verifier(url: str, **overrides: Any) -> TokenVerifier:
    values: dict[str, Any] = {
        "env": Environment.TEST,
        "jwks_url": url,
        "jwt_secret": None,
        "jwt_audience": AUDIENCE,
        "encryption_key": ENCRYPTION_KEY,
    }
    return TokenVerifier(Settings(**(values | overrides)))


async def refused(verifier: TokenVerifier, token: str) -> Unauthorized:
    with pytest.raises(Unauthorized) as caught:
        await verifier.verify(token)
    return caught.value


async def test_an_rs256_token_is_verified_with_a_key_from_the_jwks_url(jwks: JwksServer) -> None:
    key = rsa_key()
    jwks.publish(public_jwk(key, "k1"))
    account_id = uuid.uuid4()
    token = jwt.encode(
        aud_claims(sub="svc-1", account_id=str(account_id), scope="runs:read runs:write"),
        key,
        algorithm="RS256",
        headers={"kid": "k1"},
    )
    principal = await jwks_verifier(jwks.url).verify(token)
    assert principal.sub == "svc-1"
    assert principal.account_id == account_id
    assert principal.scopes == {"runs:read", "runs:write"}
    assert jwks.fetches >= 1


async def test_an_es256_token_is_verified_with_a_key_from_the_jwks_url(jwks: JwksServer) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    jwks.publish(public_jwk(key, "ec-1"))
    token = jwt.encode(aud_claims(sub="svc-2"), key, algorithm="ES256", headers={"kid": "ec-1"})
    principal = await jwks_verifier(jwks.url).verify(token)
    assert principal.sub == "svc-2"
    assert principal.account_id is None


async def test_a_jwks_verifier_refuses_an_rs256_token_signed_by_another_key(
    jwks: JwksServer,
) -> None:
    published, impostor = rsa_key(), rsa_key()
    jwks.publish(public_jwk(published, "k1"))
    verifier = jwks_verifier(jwks.url)
    forged = jwt.encode(aud_claims(), impostor, algorithm="RS256", headers={"kid": "k1"})
    assert (await refused(verifier, forged)).code == "invalid_token"
    unknown_kid = jwt.encode(aud_claims(), impostor, algorithm="RS256", headers={"kid": "k2"})
    assert (await refused(verifier, unknown_kid)).code == "invalid_token"
    # The genuine key still works through the same verifier.
    genuine = jwt.encode(aud_claims(), published, algorithm="RS256", headers={"kid": "k1"})
    assert (await verifier.verify(genuine)).sub == "someone"


async def test_a_jwks_verifier_refuses_hs256_and_none_algorithm_confusion(
    jwks: JwksServer,
) -> None:
    key = rsa_key()
    jwks.publish(public_jwk(key, "k1"))
    verifier = jwks_verifier(jwks.url)
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # The classic attack: HMAC over the token with the (public) RSA key as the secret.
    for secret in (public_pem, json.dumps(public_jwk(key, "k1")).encode()):
        confused = hand_made_token(
            {"alg": "HS256", "typ": "JWT", "kid": "k1"}, aud_claims(), secret
        )
        assert (await refused(verifier, confused)).code == "invalid_token"
    unsigned = hand_made_token({"alg": "none", "typ": "JWT", "kid": "k1"}, aud_claims(), None)
    assert (await refused(verifier, unsigned)).code == "invalid_token"
    # An HS256 token with the service's shared secret means nothing to a JWKS verifier.
    shared = jwt.encode(aud_claims(), JWT_SECRET, algorithm="HS256", headers={"kid": "k1"})
    assert (await refused(verifier, shared)).code == "invalid_token"


async def test_a_jwks_verifier_checks_expiry_audience_and_issuer(jwks: JwksServer) -> None:
    key = rsa_key()
    jwks.publish(public_jwk(key, "k1"))
    verifier = jwks_verifier(jwks.url, jwt_audience="unblock", jwt_issuer="https://idp.test")

    def signed(**overrides: Any) -> str:
        return jwt.encode(
            aud_claims(aud="unblock", iss="https://idp.test") | overrides,
            key,
            algorithm="RS256",
            headers={"kid": "k1"},
        )

    assert (await verifier.verify(signed())).sub == "someone"
    assert (await refused(verifier, signed(exp=int(time.time()) - 60))).code == "token_expired"
    assert (await refused(verifier, signed(aud="someone-else"))).code == "invalid_token"
    assert (await refused(verifier, signed(iss="https://evil.test"))).code == "invalid_token"
    no_sub = aud_claims(aud="unblock", iss="https://idp.test", sub=None)
    token = jwt.encode(no_sub, key, algorithm="RS256", headers={"kid": "k1"})
    assert (await refused(verifier, token)).code == "invalid_token"


async def test_an_unreachable_jwks_url_refuses_the_token_instead_of_crashing() -> None:
    key = rsa_key()
    verifier = jwks_verifier("http://127.0.0.1:9/jwks.json")
    token = jwt.encode(aud_claims(), key, algorithm="RS256", headers={"kid": "k1"})
    caught = await asyncio.wait_for(refused(verifier, token), 30)
    assert caught.status == 401


async def test_a_verifier_needs_a_key_source() -> None:
    with pytest.raises(ValueError, match="JWT"):
        TokenVerifier(Settings.model_construct(jwks_url=None, jwt_secret=None))


async def test_a_token_naming_a_key_of_the_other_type_is_401_not_a_crash(
    jwks: JwksServer,
) -> None:
    rsa_private, ec_private = rsa_key(), ec.generate_private_key(ec.SECP256R1())
    jwks.publish(public_jwk(rsa_private, "rsa-1"))
    jwks.publish(public_jwk(ec_private, "ec-1"))
    verifier = jwks_verifier(jwks.url)
    # Each was a TypeError inside PyJWT (a 500 with a traceback) for an unauthenticated caller.
    rs_with_ec_kid = jwt.encode(
        aud_claims(), rsa_private, algorithm="RS256", headers={"kid": "ec-1"}
    )
    es_with_rsa_kid = jwt.encode(
        aud_claims(), ec_private, algorithm="ES256", headers={"kid": "rsa-1"}
    )
    for token in (rs_with_ec_kid, es_with_rsa_kid):
        assert (await refused(verifier, token)).code == "invalid_token"
    # The right pairings still pass through the same verifier.
    good = jwt.encode(aud_claims(), ec_private, algorithm="ES256", headers={"kid": "ec-1"})
    assert (await verifier.verify(good)).sub == "someone"


async def test_unknown_kids_do_not_make_the_verifier_refetch_the_jwks_each_time(
    jwks: JwksServer,
) -> None:
    key = rsa_key()
    jwks.publish(public_jwk(key, "k1"))
    verifier = jwks_verifier(jwks.url)
    assert (await verifier.verify(jwt.encode(aud_claims(), key, "RS256", {"kid": "k1"}))).sub
    fetched = jwks.fetches
    for n in range(20):
        token = jwt.encode(aud_claims(), key, algorithm="RS256", headers={"kid": f"guess-{n}"})
        assert (await refused(verifier, token)).code == "invalid_token"
    assert jwks.fetches == fetched  # refreshes are rate-limited, not driven by callers


async def test_a_jwks_url_that_never_answers_is_given_up_on_quickly() -> None:
    hung: list[asyncio.StreamWriter] = []

    async def never_answer(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hung.append(writer)

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        verifier = jwks_verifier(f"http://127.0.0.1:{port}/jwks.json")
        token = jwt.encode(aud_claims(), rsa_key(), algorithm="RS256", headers={"kid": "k1"})
        # PyJWKClient waited 30 s in a thread; the cache gives up after a few seconds.
        caught = await asyncio.wait_for(refused(verifier, token), 10)
        assert caught.code == "invalid_token"
    finally:
        for writer in hung:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_a_jwks_token_without_this_services_audience_is_refused(jwks: JwksServer) -> None:
    key = rsa_key()
    jwks.publish(public_jwk(key, "k1"))
    verifier = jwks_verifier(jwks.url)
    for aud in (None, "another-service", ["another-service"]):
        token = jwt.encode(aud_claims(aud=aud), key, algorithm="RS256", headers={"kid": "k1"})
        assert (await refused(verifier, token)).code == "invalid_token"


async def test_keys_already_fetched_still_verify_while_the_jwks_url_is_down(
    jwks: JwksServer,
) -> None:
    key = rsa_key()
    jwks.publish(public_jwk(key, "k1"))
    verifier = jwks_verifier(jwks.url)
    token = jwt.encode(aud_claims(), key, algorithm="RS256", headers={"kid": "k1"})
    assert (await verifier.verify(token)).sub == "someone"
    jwks.server.shutdown()  # the identity provider goes away
    jwks.server.server_close()
    assert verifier._jwks is not None
    verifier._jwks.max_age = verifier._jwks.min_refresh = 0  # every call tries to refresh
    assert (await verifier.verify(token)).sub == "someone"
