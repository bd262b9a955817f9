"""The OpenAPI document tells the whole truth, by mechanism: every operation, whichever router
it comes from, gets security, problem bodies and a readable operationId."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.main import openapi_document
from app.openapi import Problem, ProblemCode
from conftest import ADMIN, Tenant, assert_problem

APP = Path(__file__).resolve().parent.parent / "app"
PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}


def _operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(m, p, op) for p, item in doc["paths"].items() for m, op in item.items()]


def test_every_error_status_of_every_operation_is_a_problem() -> None:
    doc = openapi_document()
    for method, path, op in _operations(doc):
        statuses = {int(s) for s in op["responses"]}
        assert {413, 429, 500} <= statuses, (method, path)
        for status, response in op["responses"].items():
            if int(status) >= 400 and path != "/readyz":
                assert response["content"] == {
                    "application/problem+json": {"schema": PROBLEM_REF}
                }, (method, path, status)
    assert "HTTPValidationError" not in doc["components"]["schemas"]


def test_security_and_its_answers_come_from_the_auth_dependencies() -> None:
    doc = openapi_document()
    schemes = doc["components"]["securitySchemes"]
    assert schemes["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": schemes["bearerAuth"]["description"],
    }
    assert schemes["mosaicSignature"]["name"] == "X-Mosaic-Signature"
    for method, path, op in _operations(doc):
        assert "security" in op, (method, path)
        if path.startswith("/v1/webhooks"):
            assert op["security"] == [{"mosaicSignature": []}]
            assert "401" in op["responses"]
        elif path.startswith("/v1/"):
            (requirement,) = op["security"]
            assert list(requirement) == ["bearerAuth"], (method, path)
            assert "401" in op["responses"]
            assert ("403" in op["responses"]) == bool(requirement["bearerAuth"]), (method, path)
        else:
            assert op["security"] == [], (method, path)
    # The header is a security scheme, not an optional parameter.
    webhook = doc["paths"]["/v1/webhooks/mosaic/{account_id}"]["post"]
    assert all(p["in"] != "header" for p in webhook["parameters"])
    assert {"400", "401", "404", "413", "422"} <= webhook["responses"].keys()


def test_operation_ids_are_the_route_function_names() -> None:
    doc = openapi_document()
    ids = [op["operationId"] for _, _, op in _operations(doc)]
    assert len(ids) == len(set(ids))
    assert all(re.fullmatch(r"[a-z_]+", i) for i in ids), ids
    assert "choose_plan" in ids
    assert "choose_organization_plan" in ids


def test_states_actions_events_and_plans_are_typed() -> None:
    doc = openapi_document()
    schemas = doc["components"]["schemas"]
    run = schemas["BlockedRunOut"]["properties"]
    assert run["state"] == {"$ref": "#/components/schemas/State"}
    assert run["actions"]["items"] == {"$ref": "#/components/schemas/Action"}
    assert {"$ref": "#/components/schemas/PlanOffer"} in str_refs(run["plans"])
    assert {"$ref": "#/components/schemas/CurrentPlan"} in str_refs(run["plan"])
    assert schemas["Transition"]["properties"]["event"] == {"$ref": "#/components/schemas/Event"}
    assert schemas["OrganizationOut"]["properties"]["state"] == {
        "$ref": "#/components/schemas/DecisionState"
    }
    assert set(schemas["ProblemCode"]["enum"]) == {c.value for c in ProblemCode}
    topup = doc["paths"]["/v1/blocked-runs/{blocked_run_id}/topup"]["post"]
    body = topup["requestBody"]["content"]["application/json"]["schema"]
    assert [s["$ref"].rsplit("/", 1)[1] for s in body["oneOf"]] == ["TopupEnable", "TopupDecline"]
    assert schemas["TopupEnable"]["required"] == ["enable", "threshold", "quantity"]
    listing = doc["paths"]["/v1/blocked-runs"]["get"]["parameters"]
    state = next(p for p in listing if p["name"] == "state")
    assert state["schema"]["items"] == {"$ref": "#/components/schemas/State"}


def test_action_answers_document_their_202_body() -> None:
    doc = openapi_document()
    for path in ("/v1/blocked-runs/{blocked_run_id}/choose-plan", "/v1/organization/topup"):
        responses = doc["paths"][path]["post"]["responses"]
        assert responses["202"]["content"] == responses["200"]["content"]
    register = doc["paths"]["/v1/blocked-runs"]["post"]["responses"]
    assert register["200"]["content"] == register["201"]["content"]
    assert "RegistrationVerifying" in str(register["202"]["content"])
    events = doc["paths"]["/v1/blocked-runs/{blocked_run_id}/events"]["get"]["responses"]
    stream = events["200"]["content"]["text/event-stream"]
    assert {"$ref": "#/components/schemas/RunStateEvent"} in stream["schema"]["anyOf"]
    event = doc["components"]["schemas"]["RunStateEvent"]["properties"]
    assert event["event"]["const"] == "state"
    assert event["data"]["contentSchema"] == {"$ref": "#/components/schemas/BlockedRunOut"}
    assert "ping" in events["200"]["description"]
    assert "404" in events
    assert doc["info"]["license"]["identifier"] == "MIT"
    assert doc["servers"]


def str_refs(schema: dict[str, Any]) -> list[Any]:
    """The refs a (possibly nullable, possibly array) property points at."""
    found: list[Any] = []
    for option in schema.get("anyOf", [schema]):
        found.append(option.get("items", option))
    return found


def test_every_code_the_app_raises_is_a_documented_problem_code() -> None:
    raised: set[str] = set()
    for source in APP.rglob("*.py"):
        text = source.read_text()
        # Keyword arguments (`code="…"`) and class attributes of DomainErrors (`    code = "…"`);
        # a run's error codes are assigned deeper in and are not problems.
        raised |= set(re.findall(r"\bcode=\"([a-z_]+)\"", text))
        raised |= set(re.findall(r"^    code = \"([a-z_]+)\"$", text, re.MULTILINE))
    from app.errors import _HTTP_CODES

    raised |= set(_HTTP_CODES.values())
    assert {"decision_in_progress", "invalid_state", "plan_not_offered"} <= raised  # found some
    assert raised <= {c.value for c in ProblemCode}, raised - {c.value for c in ProblemCode}


@pytest.mark.asyncio(loop_scope="session")
async def test_the_apps_own_validation_error_has_the_documented_shape(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    answer = await client.post("/v1/accounts", json={"name": ""}, headers=ADMIN)
    body = assert_problem(answer, 422, "validation_error")
    problem = Problem.model_validate(body)
    assert problem.errors
    assert {tuple(e.loc[:2]) for e in problem.errors} >= {("body", "name")}
    conflict = await client.post(
        "/v1/organization/confirm-checkout", headers=tenant.headers, json=None
    )
    problem = Problem.model_validate(assert_problem(conflict, 409))
    assert problem.code is ProblemCode.NOTHING_WAITING
    assert problem.state == "idle"
    assert set(body) <= set(Problem.model_fields)


@pytest.mark.asyncio(loop_scope="session")
async def test_a_405_lists_every_method_of_the_path(client: httpx.AsyncClient) -> None:
    answer = await client.request("OPTIONS", "/v1/blocked-runs", headers=ADMIN)
    assert_problem(answer, 405, "method_not_allowed")
    assert answer.headers["allow"] == "GET, HEAD, POST"
