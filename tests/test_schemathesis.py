"""Schemathesis against the served app: every check, positive and negative data, no 5xx.

Schemathesis runs as its own process (its CLI, as an operator would run it) against a service
on loopback with its own database and sandbox. Only server errors fail this test: the contract
side of its findings (undocumented statuses, schema mismatches) is written to the report and
belongs to the OpenAPI document's own tests.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from pathlib import Path

import pytest

from app.auth import mint_token
from conftest import JWT_SECRET, isolated_stack, make_tenant

pytestmark = pytest.mark.asyncio(loop_scope="session")

ALL_SCOPES = ["runs:read", "runs:write", "runs:register", "accounts:admin"]
SERVER_ERROR_CHECK = "not_a_server_error"


def server_errors(ndjson: Path) -> list[str]:
    """Each failed `not_a_server_error` check in the run's event stream, as one line."""
    found: list[str] = []
    for line in ndjson.read_text().splitlines():
        text = line.strip()
        if SERVER_ERROR_CHECK not in text:
            continue
        for check in _checks(json.loads(text)):
            if check.get("name") == SERVER_ERROR_CHECK and check.get("status") == "failure":
                found.append(json.dumps(check)[:2000])
    return found


def _checks(node: object) -> list[dict[str, object]]:
    """Every object in an event that looks like a check result, wherever it is nested."""
    found: list[dict[str, object]] = []
    if isinstance(node, dict):
        if "name" in node and "status" in node:
            found.append(node)
        for value in node.values():
            found.extend(_checks(value))
    elif isinstance(node, list):
        for item in node:
            found.extend(_checks(item))
    return found


async def test_schemathesis_finds_no_server_error(tmp_path: Path) -> None:
    async with isolated_stack(
        "schemathesis",
        worker=False,
        auth_failures_per_source=1_000_000,
        auth_failures_per_account=1_000_000,
    ) as stack:
        tenant = await make_tenant(stack.client, stack.mosaic)
        token = mint_token(
            JWT_SECRET, sub="schemathesis", scopes=ALL_SCOPES, account_id=tenant.account_id
        )
        ndjson = tmp_path / "events.ndjson"
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "schemathesis.cli",
            "run",
            f"{stack.service.url}/openapi.json",
            "--checks",
            "all",
            "--mode",
            "all",
            "--phases",
            "examples,coverage,fuzzing",
            "--max-examples",
            "25",
            "--seed",
            "8",
            "--workers",
            "1",
            "--suppress-health-check",
            "all",
            "--continue-on-failure",
            "--generation-database",
            "none",
            # An event stream for a live run is open until its token expires: cut it short.
            "--request-timeout",
            "3",
            "--header",
            f"Authorization: Bearer {token}",
            "--header",
            f"X-Mosaic-Signature: {tenant.webhook_secret}",
            "--report",
            "ndjson",
            "--report-ndjson-path",
            str(ndjson),
            "--no-color",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            cwd=tmp_path,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 300)
    output = out.decode(errors="replace")
    assert ndjson.exists(), output[-4000:]
    generated = re.search(r"(\d+) generated", output)
    assert generated, output[-4000:]
    assert int(generated[1]) > 100, output[-4000:]
    errors = server_errors(ndjson)
    assert not errors, "\n".join(errors[:5]) + "\n" + output[-4000:]
