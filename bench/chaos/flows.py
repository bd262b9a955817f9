"""The load: organizations of every kind, their runs blocking for credits, and the people and
internal services acting on them through the API as a frontend or a backend would."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import httpx

from app.auth import mint_token
from bench.chaos.gateway import Gateway, GaveUp
from bench.env import ADMIN, JWT_SECRET, bearer

NODES_PER_RUN = 2
NODE_COST = 100
# Enough for every run of an organization to finish once the decision is made.
PLENTY = 100_000
TOPUP = {"enable": True, "threshold": 500, "quantity": 5000}
THINK = 0.8  # seconds, at most, between a person's looks at a page that is changing
PATIENCE = 120.0  # seconds without any change before a person gives up
ACTIVE = ("checking_plan", "awaiting_choice", "awaiting_checkout", "topup_prompt", "resuming")


class Kind(StrEnum):
    FREE_CHECKOUT = "free, checkout"
    FREE_IMMEDIATE = "free, immediate upgrade"
    PAID = "paid, no auto top-up"
    PAID_AUTO_TOPUP = "paid, auto top-up on"


SANDBOX_ORG = {
    Kind.FREE_CHECKOUT: {"plan_id": None, "checkout": True},
    Kind.FREE_IMMEDIATE: {"plan_id": None, "checkout": False},
    Kind.PAID: {"plan_id": "creator"},
    # A top-up too small for one node: runs still block, and unblock should resume them at once
    # (the harness adds credits before unblock hears of the block, as a late payment would).
    Kind.PAID_AUTO_TOPUP: {
        "plan_id": "creator",
        "auto_topup": {"enabled": True, "threshold": 0, "quantity": 10},
    },
}


@dataclass
class Org:
    index: int
    kind: Kind
    runs: int
    enables_topup: bool
    organization_id: str = ""
    api_key: str = ""
    account_id: str = ""
    person: dict[str, str] = field(default_factory=dict)
    service: dict[str, str] = field(default_factory=dict)
    run_ids: list[str] = field(default_factory=list)
    registered: list[str] = field(default_factory=list)
    # The person's answers the service accepted (2xx), by question.
    answers: Counter[str] = field(default_factory=Counter)
    enable_answers: int = 0
    checkouts_paid: int = 0
    surprises: list[str] = field(default_factory=list)
    done: bool = False
    topped_up: bool = False


def plan_orgs(flows: int, rng: random.Random) -> list[Org]:
    """Organizations of every kind, 1-3 runs each, `flows` runs in all."""
    orgs: list[Org] = []
    left = flows
    kinds = list(Kind)
    while left > 0:
        runs = min(left, rng.randint(1, 3))
        kind = kinds[len(orgs) % len(kinds)]
        enables = kind is Kind.PAID or (kind is not Kind.PAID_AUTO_TOPUP and rng.random() < 0.5)
        orgs.append(Org(len(orgs), kind, runs, enables))
        left -= runs
    rng.shuffle(orgs)
    return orgs


class Load:
    def __init__(
        self,
        gateway: Gateway,
        sandbox: httpx.AsyncClient,
        rng: random.Random,
        *,
        relay_url: str,
        deadline: float,
        registered_rate: float = 0.2,
    ) -> None:
        self.gateway = gateway
        self.sandbox = sandbox
        self.rng = rng
        self.relay_url = relay_url
        self.deadline = deadline
        self.registered_rate = registered_rate
        self.by_account: dict[str, Org] = {}
        self.registrations = 0

    async def before_delivery(self, account_id: str, event: dict[str, Any]) -> None:
        """For auto top-up organizations: credits arrive before unblock hears of the block."""
        org = self.by_account.get(account_id)
        blocked = event.get("flag") == "RUN_FINISHED" and event.get("status") == "failed"
        if org is not None and org.kind is Kind.PAID_AUTO_TOPUP and blocked:
            await self._top_up(org)

    async def _top_up(self, org: Org) -> None:
        patch = {"balance": PLENTY}
        answer = await self.sandbox.patch(f"/_sandbox/orgs/{org.organization_id}", json=patch)
        answer.raise_for_status()
        org.topped_up = True

    async def setup(self, org: Org) -> None:
        secret = "whsec_" + uuid.uuid4().hex
        spec = {
            "balance": 0,
            "webhook_secret": secret,
            "nodes_per_run": NODES_PER_RUN,
            "node_cost": NODE_COST,
            "name": f"Chaos Org {org.index}",
            **SANDBOX_ORG[org.kind],
        }
        created = (await self.sandbox.post("/_sandbox/orgs", json=spec)).raise_for_status().json()
        org.organization_id, org.api_key = created["organization_id"], created["api_key"]
        body = {
            "name": f"Chaos {org.index}",
            "mosaic_api_key": org.api_key,
            "webhook_secret": secret,
        }
        answer = await self.gateway.call(
            "POST", "/v1/accounts", json=body, headers=ADMIN, deadline=self.deadline
        )
        if answer.status_code != 201:
            raise RuntimeError(f"account not created: {answer.status_code} {answer.text}")
        org.account_id = answer.json()["id"]
        self.by_account[org.account_id] = org
        org.person = _token(org, f"person-{org.index}", "runs:read", "runs:write")
        org.service = _token(org, "billing-svc", "runs:read", "runs:register")

    async def drive(self, org: Org, start_after: float) -> None:
        """One organization's whole story: set up, runs block, people and services act."""
        await asyncio.sleep(start_after)  # arrivals spread over the load window
        try:
            await self.setup(org)
            registered = [self.rng.random() < self.registered_rate for _ in range(org.runs)]
            for by_service in registered:
                body: dict[str, Any] = {
                    "organization_id": org.organization_id,
                    "agent_id": f"agent-{org.index}",
                    "video_urls": ["https://example.com/in.mp4"],
                }
                if not by_service:
                    body["callback_url"] = f"{self.relay_url}/hook/{org.account_id}"
                run = (await self.sandbox.post("/_sandbox/runs", json=body)).raise_for_status()
                run_id = run.json()["run_id"]
                org.run_ids.append(run_id)
                if by_service:
                    org.registered.append(run_id)
            await asyncio.gather(
                *(self._register(org, run_id) for run_id in org.registered), self._person(org)
            )
        except GaveUp as exc:
            org.surprises.append(f"gave up on {exc}")
        except (httpx.HTTPError, RuntimeError, KeyError, ValueError) as exc:
            # One organization's trouble is reported with the others, not the end of the run.
            org.surprises.append(f"harness: {exc!r}")
        org.done = True

    async def _register(self, org: Org, run_id: str) -> None:
        """An internal service noticed the failure itself and registers it (twice or thrice)."""
        pause = 0.1
        while True:
            state = (await self.sandbox.get(f"/_sandbox/runs/{run_id}")).json()
            if state["status"] != "running":
                break
            # The sandbox has no event for a run without a callback: poll, backing off.
            await asyncio.sleep(pause)
            pause = min(pause * 2, 2.0)
        if state["status"] != "failed":
            return  # it finished (credits arrived meanwhile): nothing for the service to report
        if org.kind is Kind.PAID_AUTO_TOPUP:
            await self._top_up(org)
        body = {"run_id": run_id, "agent_id": f"agent-{org.index}"}

        async def once() -> None:
            pause = 0.2
            while True:
                answer = await self.gateway.call(
                    "POST",
                    "/v1/blocked-runs",
                    json=body,
                    headers=org.service,
                    deadline=self.deadline,
                )
                self.registrations += 1
                # 202: a run blocked before is being verified with Mosaic; ask again shortly.
                if answer.status_code != 202 or time.monotonic() > self.deadline:
                    break
                await asyncio.sleep(pause)
                pause = min(pause * 2, 2.0)
            if answer.status_code not in (200, 201):
                org.surprises.append(f"register {run_id}: {answer.status_code} {answer.text}")

        await asyncio.gather(*(once() for _ in range(self.rng.choice((2, 3)))))

    async def _person(self, org: Org) -> None:
        """A person with the product open: answers whatever question a run shows, until every
        run of the organization is running again (or nothing has moved for `PATIENCE`)."""
        paid: set[str] = set()
        pause = THINK
        seen_last, moved_at = "", time.monotonic()
        while time.monotonic() < self.deadline:
            page = await self.gateway.call(
                "GET",
                "/v1/blocked-runs",
                params={"limit": 200},
                headers=org.person,
                deadline=self.deadline,
            )
            items = page.json()["items"] if page.status_code == 200 else []
            now_seen = repr(sorted((i["id"], i["state"], i["pending"]) for i in items))
            if now_seen != seen_last:
                seen_last, moved_at, pause = now_seen, time.monotonic(), THINK
            asked = [
                item
                for item in items
                if not item["pending"]
                and {"choose_plan", "confirm_checkout", "topup"} & set(item["actions"])
            ]
            if asked:
                await self._answer(org, self.rng.choice(asked), paid)
                pause = THINK
            elif await self._nothing_left_to_answer(org, items):
                return
            elif time.monotonic() - moved_at > PATIENCE:
                org.surprises.append(f"nothing moved for {PATIENCE:.0f}s; the person left")
                return
            # Think time, longer while nothing changes: hundreds of people polling at once
            # would otherwise be the load instead of the flows.
            await asyncio.sleep(self.rng.uniform(pause / 2, pause))
            pause = min(pause * 1.5, 5.0)
        org.surprises.append("person still waiting at the deadline")

    async def _nothing_left_to_answer(self, org: Org, items: list[dict[str, Any]]) -> bool:
        """Every run is running again, or unblock has closed every episode of a run that is not
        (then no question will come: the checks report the run)."""
        state = (await self.sandbox.get(f"/_sandbox/orgs/{org.organization_id}")).json()
        ours = {run["run_id"]: run for run in state["runs"] if run["run_id"] in org.run_ids}
        if len(ours) != org.runs:
            return False
        for run_id, run in ours.items():
            if run["status"] == "completed":
                continue
            episodes = [item for item in items if item["run_id"] == run_id]
            if run["status"] == "running" or not episodes:
                return False
            if any(item["state"] in ACTIVE or item["pending"] for item in episodes):
                return False
        return True

    async def _answer(self, org: Org, item: dict[str, Any], paid: set[str]) -> None:
        base = f"/v1/blocked-runs/{item['id']}"
        if item["state"] == "awaiting_checkout" and item.get("checkout_url"):
            checkout_id = item["checkout_url"].rstrip("/").rsplit("/", 1)[-1]
            if checkout_id not in paid:
                await self._pay(org, checkout_id)
                paid.add(checkout_id)
            await self._act(org, "confirm_checkout", f"{base}/confirm-checkout", None)
        elif "choose_plan" in item["actions"]:
            offered = [plan["id"] for plan in item.get("plans") or []] or ["creator"]
            await self._act(org, "choose_plan", f"{base}/choose-plan", self.rng.choice(offered))
        elif "topup" in item["actions"]:
            await self._act(org, "topup", f"{base}/topup", None)

    async def _pay(self, org: Org, checkout_id: str) -> None:
        """The person presses Pay on the hosted checkout page."""
        answer = await self.sandbox.post(f"/_sandbox/checkouts/{checkout_id}/complete")
        if answer.status_code == 200:
            org.checkouts_paid += 1
        elif answer.status_code != 409:  # 409: closed already (paid in another tab)
            org.surprises.append(f"checkout {checkout_id}: {answer.status_code}")

    async def _act(self, org: Org, action: str, path: str, plan_id: str | None) -> None:
        if action == "choose_plan":
            body: dict[str, Any] | None = {"plan_id": plan_id}
        elif action == "topup":
            body = TOPUP if org.enables_topup else {"enable": False}
        else:
            body = None
        tries: list[int] = []
        answer = await self.gateway.call(
            "POST", path, json=body, headers=org.person, deadline=self.deadline, tries=tries
        )
        # A 409 after a lost attempt may mean that attempt was carried out: count it as given.
        accepted = answer.status_code in (200, 202) or (answer.status_code == 409 and tries[0] > 1)
        if accepted:
            if action != "confirm_checkout":
                org.answers[action] += 1
            if action == "topup" and org.enables_topup:
                org.enable_answers += 1
        elif answer.status_code != 409:  # 409: the run moved on meanwhile; look again
            org.surprises.append(f"{action}: {answer.status_code} {answer.text[:200]}")


def _token(org: Org, sub: str, *scopes: str) -> dict[str, str]:
    return bearer(mint_token(JWT_SECRET, sub=sub, scopes=list(scopes), account_id=org.account_id))
