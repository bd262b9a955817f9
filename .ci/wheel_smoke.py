"""Wheel smoke test: run by .ci/run with the python of a fresh venv that has only the built
wheel installed, from a directory outside the checkout.

`unblock migrate`, then `unblock sandbox` and `unblock serve`; an account; one signed
RUN_FINISHED webhook; the run must show up blocked, waiting for a plan choice. Standard library
only (plus what the wheel brings), so nothing from the checkout can leak in.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import app

UNBLOCK = str(Path(sys.executable).with_name("unblock"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def call(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=15) as answer:
        return answer.status, json.loads(answer.read() or b"null")


def until(what: str, probe: Any, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if result := probe():
                return result
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.2)
    raise SystemExit(f"wheel smoke: timed out waiting for {what}")


def main() -> None:
    checkout = Path(os.environ["UNBLOCK_CHECKOUT"]).resolve()
    where = Path(app.__file__).resolve()
    assert checkout not in where.parents, f"app imported from the checkout: {where}"
    migrations = where.parent / "migrations"
    assert (migrations / "script.py.mako").is_file(), "script.py.mako missing from the wheel"
    assert list((migrations / "versions").glob("*.py")), "revisions missing from the wheel"
    assert (where.parent / "py.typed").is_file(), "py.typed missing from the wheel"

    from cryptography.fernet import Fernet

    api_port, sandbox_port = free_port(), free_port()
    api, sandbox = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{sandbox_port}"
    jwt_secret = "ci-" + uuid.uuid4().hex * 2
    env = os.environ | {
        "UNBLOCK_JWT_SECRET": jwt_secret,
        "UNBLOCK_ENCRYPTION_KEY": Fernet.generate_key().decode(),
        "UNBLOCK_PUBLIC_URL": api,
        "MOSAIC_BASE_URL": sandbox,
        "UNBLOCK_LOG_FORMAT": "json",
    }
    print(subprocess.run([UNBLOCK, "--version"], check=True, capture_output=True, text=True).stdout)
    subprocess.run([UNBLOCK, "migrate"], env=env, check=True)

    children = [
        subprocess.Popen([UNBLOCK, "sandbox", "--port", str(sandbox_port)], env=env),
        subprocess.Popen([UNBLOCK, "serve", "--port", str(api_port)], env=env),
    ]
    try:
        until("the sandbox", lambda: call("GET", f"{sandbox}/_sandbox/calls")[0] == 200)
        until("serve to be ready", lambda: call("GET", f"{api}/readyz")[0] == 200)

        def token(*scopes: str, account: str | None = None) -> dict[str, str]:
            args = [UNBLOCK, "token", "--sub", "ci"]
            args += [a for s in scopes for a in ("--scope", s)]
            args += ["--account-id", account] if account else []
            minted = subprocess.run(args, env=env, check=True, capture_output=True, text=True)
            return {"Authorization": f"Bearer {minted.stdout.strip()}"}

        secret = "whsec_" + uuid.uuid4().hex
        _, org = call(
            "POST",
            f"{sandbox}/_sandbox/orgs",
            {"plan_id": None, "balance": 0, "checkout": True, "webhook_secret": secret},
        )
        status, account = call(
            "POST",
            f"{api}/v1/accounts",
            {"name": "Wheel smoke", "mosaic_api_key": org["api_key"], "webhook_secret": secret},
            token("accounts:admin"),
        )
        assert status == 201, account
        _, run = call(
            "POST",
            f"{sandbox}/_sandbox/runs",
            {
                "organization_id": org["organization_id"],
                "agent_id": "agent-ci",
                "video_urls": ["https://example.com/in.mp4"],
            },
        )
        run_id = run["run_id"]
        until(
            "the Mosaic run to fail for credits",
            lambda: call("GET", f"{sandbox}/_sandbox/runs/{run_id}")[1]["status"] == "failed",
        )
        event = {
            "flag": "RUN_FINISHED",
            "agent_id": "agent-ci",
            "run_id": run_id,
            "status": "failed",
            "needs_credits": True,
        }
        status, ack = call("POST", account["webhook_url"], event, {"X-Mosaic-Signature": secret})
        assert (status, ack["status"]) == (202, "accepted"), ack
        user = token("runs:read", account=account["id"])

        def blocked() -> bool:
            _, page = call("GET", f"{api}/v1/blocked-runs?run_id={run_id}", headers=user)
            return bool(page["items"]) and page["items"][0]["state"] == "awaiting_choice"

        until("the blocked run to wait for a plan choice", blocked)
    finally:
        for child in children:
            child.send_signal(signal.SIGTERM)
        codes = [child.wait(timeout=30) for child in children]
    assert codes[1] == 0, f"serve exited {codes[1]} on SIGTERM"
    print("wheel smoke: 1 passed, 0 failed")


if __name__ == "__main__":
    main()
