"""Wheel smoke test: run by .ci/run with the python of a fresh venv that has only the built
unblock wheel installed, from a directory outside the checkout.

The wheel holds the service and not the Mosaic sandbox: `unblock sandbox` and `unblock dev` say
in one line what to install. The sandbox's own wheel, alone in a second venv (SANDBOX_PYTHON),
serves the Mosaic double. Then `unblock migrate` and `unblock serve`; an account; one signed
RUN_FINISHED webhook; the run must show up blocked, waiting for a plan choice. Standard library
only (plus what the wheel brings), so nothing from the checkout can leak in.
"""

from __future__ import annotations

import importlib.util
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
import zipfile
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


def without_the_sandbox() -> None:
    """The unblock wheel has no sandbox in it, and its commands that need one say so."""
    wheel = zipfile.ZipFile(os.environ["UNBLOCK_WHEEL"])
    names = wheel.namelist()
    assert "app/py.typed" in names, "unblock wheel: app/py.typed missing"
    leaked = [n for n in names if n.startswith("mosaic_sandbox")]
    assert not leaked, f"the sandbox is in the unblock wheel: {leaked[:3]}"
    assert importlib.util.find_spec("mosaic_sandbox") is None, "mosaic_sandbox importable"

    helped = subprocess.run([UNBLOCK, "sandbox", "--help"], capture_output=True, text=True)
    assert helped.returncode == 0, helped.stderr
    assert "pip install ./sandbox" in " ".join(helped.stdout.split()), helped.stdout
    for command in (["sandbox"], ["dev", "--port", str(free_port())]):
        done = subprocess.run([UNBLOCK, *command], capture_output=True, text=True, timeout=60)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2, (command, done.returncode, done.stderr)
        assert len(lines) == 1, (command, done.stderr)
        assert lines[0].startswith("unblock: the Mosaic sandbox"), lines[0]
        assert "pip install ./sandbox" in lines[0], lines[0]
        print(f"unblock {command[0]} without the sandbox: {lines[0]}")


def sandbox_alone(sandbox_python: str) -> None:
    """The sandbox's own wheel, alone in its venv: it runs, and brings nothing of unblock."""
    helped = subprocess.run(
        [sandbox_python, "-m", "mosaic_sandbox", "--help"], capture_output=True, text=True
    )
    assert helped.returncode == 0, helped.stderr
    assert "--step-delay" in helped.stdout, helped.stdout
    probe = "import importlib.util as u, mosaic_sandbox as m, pathlib as p; "
    probe += "assert u.find_spec('app') is None, 'unblock came with the sandbox'; "
    probe += "assert (p.Path(m.__file__).parent / 'py.typed').is_file(), 'py.typed missing'; "
    probe += "print(m.__file__)"
    where = subprocess.run([sandbox_python, "-c", probe], capture_output=True, text=True)
    assert where.returncode == 0, where.stderr
    checkout = Path(os.environ["UNBLOCK_CHECKOUT"]).resolve()
    assert checkout not in Path(where.stdout.strip()).parents, where.stdout


def main() -> None:
    without_the_sandbox()
    sandbox_python = os.environ["SANDBOX_PYTHON"]
    sandbox_alone(sandbox_python)

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
        subprocess.Popen(
            [sandbox_python, "-m", "mosaic_sandbox", "--port", str(sandbox_port)], env=env
        ),
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
