"""Everything one sandbox instance remembers: organizations, runs, checkouts, traffic.

All of it lives in one `Sandbox` object per app (`app.state.sandbox`). Every handler is
`async def` and the run engine is a set of tasks on the same loop, so state changes never race:
they happen between awaits, on one thread.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from mosaic_sandbox.catalogue import PLANS, Plan
from mosaic_sandbox.clock import one_month_after
from mosaic_sandbox.traffic import CallRecord, FaultBook
from mosaic_sandbox.webhooks import WebhookDispatcher


class RunStatus(StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    PARTIAL_COMPLETE = "partial_complete"
    FAILED = "failed"
    CANCELLED = "cancelled"


class NodeStatus(StrEnum):
    NOT_STARTED = "not_started"
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    PARTIAL_COMPLETE = "partial_complete"
    FAILED = "failed"
    BLOCKED = "blocked"
    CANCELLED = "cancelled"


class CheckoutStatus(StrEnum):
    OPEN = "open"
    PAID = "paid"
    CANCELLED = "cancelled"


@dataclass
class AutoTopup:
    enabled: bool = False
    threshold: int | float = 0
    quantity: int | float = 0


@dataclass
class Quirks:
    """Per-organization switches for the places where Mosaic's own documents disagree (§9)."""

    needs_credits_camel_case: bool = False
    checkout_success: bool = True
    legacy_credits_shape: bool = False


@dataclass
class TopUp:
    at: datetime
    quantity: int | float
    reason: str
    balance_after: int | float


@dataclass
class Organization:
    id: str
    name: str
    slug: str
    api_key: str
    created_at: datetime
    balance: int | float
    checkout_required: bool
    webhook_secret: str | None
    nodes_per_run: int
    node_cost: int | float
    quirks: Quirks
    plan_id: str | None = None
    plan_started_at: datetime | None = None
    period_start: datetime | None = None
    usage: int | float = 0
    last_used_at: datetime | None = None
    auto_topup: AutoTopup = field(default_factory=AutoTopup)
    topups: list[TopUp] = field(default_factory=list)

    @property
    def plan(self) -> Plan | None:
        return None if self.plan_id is None else PLANS[self.plan_id]

    @property
    def period_end(self) -> datetime | None:
        return None if self.period_start is None else one_month_after(self.period_start)

    @property
    def auto_topup_eligible(self) -> bool:
        return self.plan is not None and self.plan.auto_topup_eligible

    @property
    def needs_credits_key(self) -> str:
        return "needsCredits" if self.quirks.needs_credits_camel_case else "needs_credits"


@dataclass(frozen=True)
class Tile:
    """The kind of work a node does (Mosaic calls it a node type)."""

    node_type_id: str
    node_type_name: str
    docs_url: str
    params_docs_url: str


@dataclass
class Render:
    """A finished video a node produced; `id` is what Mosaic accepts as `node_render_ids`."""

    id: str
    video_url: str
    thumbnail_url: str | None
    premiere_prproj_url: str | None
    completed_at: datetime
    original_node_id: str | None


@dataclass
class Node:
    agent_node_id: str
    original_node_id: str
    tile: Tile
    status: NodeStatus = NodeStatus.QUEUED
    status_message: str | None = None
    errors: list[str] = field(default_factory=list)
    needs_credits: bool = False
    render: Render | None = None


@dataclass
class Run:
    id: str
    agent_id: str
    organization_id: str
    callback_url: str | None
    inputs: list[dict[str, str | None]]
    nodes: list[Node]
    started_at: datetime
    updated_at: datetime
    status: RunStatus = RunStatus.RUNNING
    status_message: str | None = None
    resumes: int = 0
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def needs_credits(self) -> bool:
        return any(node.needs_credits for node in self.nodes)

    @property
    def renders(self) -> list[Render]:
        return [node.render for node in self.nodes if node.render is not None]


@dataclass
class Checkout:
    id: str
    organization_id: str
    plan_id: str
    url: str
    success_url: str | None
    cancel_url: str | None
    created_at: datetime
    status: CheckoutStatus = CheckoutStatus.OPEN
    closed_at: datetime | None = None


class Sandbox:
    """One sandbox's whole world, created fresh per app."""

    def __init__(
        self,
        *,
        seed: int,
        step_delay: float,
        webhook_retry_base: float,
        webhook_max_attempts: int,
    ) -> None:
        self.seed = seed
        self.step_delay = step_delay
        # One generator for ids and fault rates, so a sequence of calls can be replayed exactly.
        self.rng = random.Random(seed)
        self.faults = FaultBook(self.rng)
        self.webhooks = WebhookDispatcher(
            retry_base=webhook_retry_base, max_attempts=webhook_max_attempts
        )
        self.organizations: dict[str, Organization] = {}
        self.runs: dict[str, Run] = {}
        self.checkouts: dict[str, Checkout] = {}
        self.calls: list[CallRecord] = []

    def new_uuid(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def new_token(self, prefix: str, hex_digits: int = 32) -> str:
        return f"{prefix}{self.rng.getrandbits(hex_digits * 4):0{hex_digits}x}"

    def organization_by_key(self, api_key: str) -> Organization | None:
        return next((org for org in self.organizations.values() if org.api_key == api_key), None)

    def runs_of(self, organization_id: str) -> list[Run]:
        return [run for run in self.runs.values() if run.organization_id == organization_id]

    def reset(self, seed: int | None = None) -> None:
        """Forget everything and re-seed, so what follows repeats what followed the last reset."""
        self._stop_runs()
        self.webhooks.reset()
        self.faults.clear()
        self.organizations.clear()
        self.runs.clear()
        self.checkouts.clear()
        self.calls.clear()
        if seed is not None:
            self.seed = seed
        self.rng.seed(self.seed)

    async def aclose(self) -> None:
        self._stop_runs()
        await self.webhooks.aclose()

    def _stop_runs(self) -> None:
        for run in self.runs.values():
            if run.task is not None and not run.task.done():
                run.task.cancel()
