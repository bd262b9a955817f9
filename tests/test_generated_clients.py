"""An internal service's view of the contract: a client generated from openapi/openapi.json by
openapi-python-client walks the whole flow, errors included, against a served app and sandbox.

Every answer is parsed by the generated models (an undocumented status raises, a body that does
not match its schema fails to parse), so a drift between the document and the service fails here.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from app.auth import mint_token
from conftest import ADMIN, JWT_SECRET, Stack, eventually, isolated_stack, start_mosaic_run

pytestmark = pytest.mark.asyncio(loop_scope="session")

ROOT = Path(__file__).resolve().parent.parent
DOCUMENT = ROOT / "openapi" / "openapi.json"
CONFIG = ROOT / "clients" / "python" / "config.yaml"
PACKAGE = "unblock_client"


def _generator() -> str | None:
    candidates = [
        os.environ.get("UNBLOCK_OPENAPI_PYTHON_CLIENT"),
        str(ROOT / ".venv-clients" / "bin" / "openapi-python-client"),
        shutil.which("openapi-python-client"),
    ]
    return next((c for c in candidates if c and Path(c).exists()), None)


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ModuleType]]:
    generator = _generator()
    if generator is None:
        # CI installs the generator (clients/python/requirements.txt) and sets this: never skips.
        if os.environ.get("UNBLOCK_REQUIRE_CLIENTS"):
            pytest.fail("openapi-python-client is required (UNBLOCK_REQUIRE_CLIENTS is set)")
        pytest.skip("openapi-python-client is not installed (pip install -r clients/python/…)")
    out = tmp_path_factory.mktemp("client")
    subprocess.run(
        [
            generator,
            "generate",
            "--path",
            str(DOCUMENT),
            "--meta",
            "none",
            "--config",
            str(CONFIG),
            "--output-path",
            str(out / PACKAGE),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    sys.path.insert(0, str(out))
    try:
        names = [
            "client",
            "models",
            "types",
            "api.accounts.create_account",
            "api.accounts.read_account",
            "api.blocked_runs.register_run",
            "api.blocked_runs.list_runs",
            "api.blocked_runs.read_run",
            "api.blocked_runs.choose_plan",
            "api.blocked_runs.confirm_checkout",
            "api.blocked_runs.answer_topup",
            "api.blocked_runs.cancel",
            "api.blocked_runs.events",
            "api.organization.read_organization",
            "api.organization.choose_organization_plan",
            "api.webhooks.mosaic_webhook",
        ]
        yield {
            name.rsplit(".", 1)[-1]: importlib.import_module(f"{PACKAGE}.{name}") for name in names
        }
    finally:
        sys.path.remove(str(out))
        for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
            del sys.modules[name]


def _client(c: dict[str, ModuleType], url: str, headers: dict[str, str] | None) -> Any:
    token = (headers or {}).get("Authorization", "Bearer ").removeprefix("Bearer ")
    # raise_on_unexpected_status: a status the document does not declare is a failure.
    return c["client"].AuthenticatedClient(
        base_url=url, token=token, raise_on_unexpected_status=True, timeout=15
    )


async def test_generated_python_client_walks_the_whole_flow_with_errors(
    generated: dict[str, ModuleType],
) -> None:
    c = generated
    m = c["models"]
    async with isolated_stack("pyclient", action_deadline=0.5) as stack:
        url = stack.service.url
        admin = _client(c, url, ADMIN)

        # Accounts: a 422 is the documented Problem with its per-field errors.
        bad = await c["create_account"].asyncio_detailed(
            client=admin, body=m.AccountCreate(name="", mosaic_api_key="mk_x")
        )
        assert bad.status_code == 422
        assert isinstance(bad.parsed, m.Problem)
        assert bad.parsed.code is m.ProblemCode.VALIDATION_ERROR
        assert bad.parsed.errors
        assert bad.parsed.errors[0].loc[0] == "body"

        org = await _sandbox_org(stack)
        created = await c["create_account"].asyncio_detailed(
            client=admin,
            body=m.AccountCreate(
                name="Client Org", mosaic_api_key=org["api_key"], webhook_secret=org["secret"]
            ),
        )
        assert created.status_code == 201
        account = created.parsed
        assert isinstance(account, m.AccountCreated)
        tenant = _Tenant(account, org)

        person = _client(c, url, tenant.token("runs:read", "runs:write"))
        service = _client(c, url, tenant.token("runs:read", "runs:register"))
        anonymous = c["client"].Client(base_url=url, raise_on_unexpected_status=True)

        # 401 and 403 are Problems with their stable codes.
        no_token = await c["list_runs"].asyncio_detailed(client=anonymous)  # type: ignore[arg-type]
        assert no_token.status_code == 401
        assert no_token.parsed.code is m.ProblemCode.MISSING_TOKEN
        no_scope = await c["register_run"].asyncio_detailed(
            client=person, body=m.RegisterRun(run_id="run-x")
        )
        assert no_scope.status_code == 403
        assert no_scope.parsed.code is m.ProblemCode.MISSING_SCOPE

        # The webhook's signature is a security scheme; a wrong one is a Problem too.
        forged = await c["mosaic_webhook"].asyncio_detailed(
            account_id=account.id,
            client=anonymous.with_headers({"X-Mosaic-Signature": "nope"}),
            body=m.MosaicWebhookBody.from_dict({"flag": "RUN_STARTED", "run_id": "r"}),
        )
        assert forged.status_code == 401
        assert forged.parsed.code is m.ProblemCode.BAD_SIGNATURE

        # An internal service registers a run that blocked without telling us: 201, then 200.
        run_id = await start_mosaic_run(stack.mosaic, tenant, report=False)  # type: ignore[arg-type]
        registered = await c["register_run"].asyncio_detailed(
            client=service, body=m.RegisterRun(run_id=run_id)
        )
        assert registered.status_code == 201
        run = registered.parsed
        assert isinstance(run, m.BlockedRunOut)
        again = await c["register_run"].asyncio_detailed(
            client=service, body=m.RegisterRun(run_id=run_id)
        )
        assert again.status_code == 200
        assert again.parsed.id == run.id

        async def offered() -> Any:
            got = await c["read_run"].asyncio_detailed(run.id, client=person)
            return got.parsed if got.parsed.state is m.State.AWAITING_CHOICE else None

        run = await eventually(offered, what="plans offered")
        assert m.Action.CHOOSE_PLAN in run.actions
        assert "creator" in [plan.id for plan in run.plans]
        page = await c["list_runs"].asyncio_detailed(
            client=person, state=[m.State.AWAITING_CHOICE, m.State.TOPUP_PROMPT]
        )
        assert [item.id for item in page.parsed.items] == [run.id]

        # 404, 409 and a domain 422, each a Problem the caller can switch on.
        unknown = await c["read_run"].asyncio_detailed(uuid.uuid4(), client=person)
        assert unknown.status_code == 404
        assert unknown.parsed.code is m.ProblemCode.BLOCKED_RUN_NOT_FOUND
        early = await c["answer_topup"].asyncio_detailed(
            run.id, client=person, body=m.TopupDecline(enable=False)
        )
        assert early.status_code == 409
        assert early.parsed.code is m.ProblemCode.INVALID_STATE
        assert early.parsed.state == "awaiting_choice"
        assert m.Action.CHOOSE_PLAN in early.parsed.actions
        not_offered = await c["choose_plan"].asyncio_detailed(
            run.id, client=person, body=m.ChoosePlan(plan_id="no-such-plan")
        )
        assert not_offered.status_code == 422
        assert not_offered.parsed.code is m.ProblemCode.PLAN_NOT_OFFERED

        chosen = await c["choose_plan"].asyncio_detailed(
            run.id, client=person, body=m.ChoosePlan(plan_id="creator")
        )
        assert chosen.status_code == 200
        assert chosen.parsed.state is m.State.AWAITING_CHECKOUT
        checkout_id = chosen.parsed.checkout_url.rstrip("/").rsplit("/", 1)[1]
        (await stack.mosaic.post(f"/_sandbox/checkouts/{checkout_id}/complete")).raise_for_status()
        confirmed = await c["confirm_checkout"].asyncio_detailed(run.id, client=person)
        assert confirmed.status_code == 200
        assert confirmed.parsed.state is m.State.TOPUP_PROMPT
        assert confirmed.parsed.plan.id == "creator"

        # Mosaic slow on the settings write: 202 with the run, pending, parsed all the same.
        await stack.fault(
            method="POST", path="/credits/settings", action="latency", latency_ms=2000, count=1
        )
        topup = await c["answer_topup"].asyncio_detailed(
            run.id,
            client=person,
            body=m.TopupEnable(enable=True, threshold=100, quantity=1000),
        )
        assert topup.status_code == 202
        assert isinstance(topup.parsed, m.BlockedRunOut)
        assert topup.parsed.pending is True

        async def resumed() -> Any:
            got = await c["read_run"].asyncio_detailed(run.id, client=person)
            return got.parsed if got.parsed.state is m.State.RESUMED else None

        done = await eventually(resumed, timeout=20, what="resumed")
        assert done.topup.enabled is True
        assert m.Event.TOPUP_ENABLED in [entry.event for entry in done.history]

        organization = await c["read_organization"].asyncio_detailed(client=person)
        assert organization.parsed.state is m.DecisionState.DECIDED
        nothing = await c["choose_organization_plan"].asyncio_detailed(
            client=person, body=m.ChoosePlan(plan_id="creator")
        )
        assert nothing.status_code == 409
        assert isinstance(nothing.parsed, m.Problem)

        # The stream of a finished run: one `state` event, then it ends.
        stream = await c["events"].asyncio_detailed(run.id, client=person)
        assert stream.status_code == 200
        assert "event: state" in stream.parsed
        assert f"id: {done.version}" in stream.parsed


class _Tenant:
    """Enough of conftest.Tenant for start_mosaic_run, from the generated account model."""

    def __init__(self, account: Any, org: dict[str, Any]) -> None:
        self.account_id = str(account.id)
        self.webhook_url = account.webhook_url
        self.organization_id = org["organization_id"]

    def token(self, *scopes: str) -> dict[str, str]:
        token = mint_token(
            JWT_SECRET, sub="client", scopes=list(scopes), account_id=self.account_id
        )
        return {"Authorization": f"Bearer {token}"}


async def _sandbox_org(stack: Stack) -> dict[str, Any]:
    secret = "whsec_" + uuid.uuid4().hex
    spec = {"plan_id": None, "balance": 0, "checkout": True, "webhook_secret": secret}
    created = (await stack.mosaic.post("/_sandbox/orgs", json=spec)).raise_for_status().json()
    return created | {"secret": secret}
