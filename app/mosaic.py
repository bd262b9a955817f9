"""The Mosaic API client: one shared aiohttp session, typed and tolerant models.

Mosaic's public docs disagree with themselves in places (docs/mosaic.md); every model here accepts
each documented reading and ignores fields it does not know.
"""

from __future__ import annotations

import email.utils
import json
import logging
import time
import urllib.request
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import quote

import aiohttp
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator
from yarl import URL

from app import log as log_context
from app import metrics
from app.settings import Settings

# Plans whose organizations may enable auto top-up (newest wording of POST /credits/settings).
TOPUP_ELIGIBLE_PLANS = frozenset(
    {"creator", "creator_annual", "professional", "professional_annual"}
)
_FREE_PLAN_IDS = frozenset({"", "free", "none"})

M = TypeVar("M", bound=BaseModel)
log = logging.getLogger(__name__)


class MosaicModel(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class Plan(MosaicModel):
    id: str | None = None
    family: str | None = None
    status: str | None = None
    current_period_end: str | None = None


class PlanState(MosaicModel):
    organization_id: str | None = None
    plan: Plan | None = None
    scheduled_plan: Plan | None = None

    @field_validator("plan", "scheduled_plan", mode="before")
    @classmethod
    def _bare_id(cls, value: Any) -> Any:
        # Tolerate a plan given as its bare id ("free", "creator").
        return {"id": value} if isinstance(value, str) else value

    @property
    def is_paid(self) -> bool:
        """Free ⇔ no plan, an inactive plan, or an id that names no paid plan."""
        plan = self.plan
        if plan is None or not plan.id or plan.id.lower() in _FREE_PLAN_IDS:
            return False
        return plan.status is None or plan.status.lower() in {"active", "trialing"}


class PlanOffer(MosaicModel):
    id: str
    # Other ids Mosaic accepts for the same plan (the older list names them, e.g. `pro`).
    aliases: list[str] = Field(default_factory=list)
    billing: str | None = None
    price_usd: float | None = None
    credits_per_month: float | None = None
    top_up_rate_per_100_credits_usd: float | None = None
    notes: str | None = None


class _LegacyPlanGroup(MosaicModel):
    """The older GET /plan/list entry: one per family, prices per billing period."""

    id: str
    aliases: list[str] = Field(default_factory=list)
    monthly_price_usd: float | None = None
    annual_price_usd: float | None = None
    credits_per_month: float | None = None
    top_up_rate_per_100_credits_usd: float | None = None
    notes: str | None = None

    def offers(self) -> list[PlanOffer]:
        # A family without prices (enterprise) cannot be bought through the API.
        common = {
            "credits_per_month": self.credits_per_month,
            "top_up_rate_per_100_credits_usd": self.top_up_rate_per_100_credits_usd,
            "notes": self.notes,
        }
        annual_id = f"{self.id}_annual"
        monthly_aliases = [a for a in self.aliases if a not in (self.id, annual_id)]
        offers = []
        if self.monthly_price_usd is not None:
            offers.append(
                PlanOffer(
                    id=self.id,
                    aliases=monthly_aliases,
                    billing="monthly",
                    price_usd=self.monthly_price_usd,
                    **common,
                )
            )
        if self.annual_price_usd is not None and annual_id in self.aliases:
            offers.append(
                PlanOffer(id=annual_id, billing="annual", price_usd=self.annual_price_usd, **common)
            )
        return offers


def parse_plan_list(body: Any) -> list[PlanOffer]:
    items = body.get("plans", []) if isinstance(body, dict) else body
    offers: list[PlanOffer] = []
    for item in items or []:
        if not isinstance(item, dict) or not item.get("id"):
            continue
        if "price_usd" not in item and ("monthly_price_usd" in item or "aliases" in item):
            offers.extend(_LegacyPlanGroup.model_validate(item).offers())
        else:
            offers.append(PlanOffer.model_validate(item))
    return offers


class UpgradeResult(MosaicModel):
    success: bool | None = None
    requires_checkout: bool = False
    plan_id: str | None = None
    plan_family: str | None = None
    checkout_url: str | None = None


class AutoTopup(MosaicModel):
    eligible: bool | None = None
    enabled: bool = False
    threshold: float = 0
    quantity: float = 0

    @field_validator("enabled", "threshold", "quantity", mode="before")
    @classmethod
    def _null_is_off(cls, value: Any) -> Any:
        return 0 if value is None else value


class Credits(MosaicModel):
    organization_id: str | None = None
    balance: float | None = None
    plan: str | None = None
    plan_id: str | None = None
    auto_topup: AutoTopup | None = None


def parse_credits(body: dict[str, Any]) -> Credits:
    credits = Credits.model_validate(body)
    nested = body.get("credits")
    # The older shape nests the balance: read `balance ?? credits.balance` (and the same for
    # auto top-up, should a double of that shape carry it there).
    if isinstance(nested, dict):
        if credits.balance is None:
            credits.balance = nested.get("balance")
        if credits.auto_topup is None and isinstance(nested.get("auto_topup"), dict):
            credits.auto_topup = AutoTopup.model_validate(nested["auto_topup"])
    return credits


def _is_true(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.strip().lower() == "true")


def _flagged(obj: dict[str, Any]) -> bool:
    return _is_true(obj.get("needs_credits")) or _is_true(obj.get("needsCredits"))


class _Flagged(MosaicModel):
    needs_credits: bool = Field(
        default=False, validation_alias=AliasChoices("needs_credits", "needsCredits")
    )

    @field_validator("needs_credits", mode="before")
    @classmethod
    def _lax_flag(cls, value: Any) -> bool:
        return _is_true(value)


class AgentRun(_Flagged):
    agent_id: str | None = None
    status: str | None = None
    status_message: str | None = None


class RunNode(_Flagged):
    agent_node_id: str | None = None
    status: str | None = None
    status_message: str | None = None


def needs_credits(payload: dict[str, Any]) -> bool:
    """Either spelling, on the run or on any node, marks a run credit-blocked."""
    if _flagged(payload):
        return True
    for key in ("nodes", "updated_nodes"):
        nodes = payload.get(key)
        for node in nodes if isinstance(nodes, list) else []:
            if isinstance(node, dict) and _flagged(node):
                return True
    return False


class MosaicError(Exception):
    """A Mosaic call that did not succeed. status None means no HTTP answer at all."""

    def __init__(
        self,
        status: int | None,
        detail: str,
        *,
        retry_after: float | None = None,
        unexpected_shape: bool = False,
        reached: bool = True,
    ) -> None:
        super().__init__(f"Mosaic answered {status}: {detail}" if status else detail)
        self.status = status
        self.detail = detail
        self.retry_after = retry_after
        self.unexpected_shape = unexpected_shape
        self.reached = reached

    @property
    def ambiguous(self) -> bool:
        """Mosaic may have acted although the call failed: the request reached it, and the
        answer was lost (a timeout, a dropped connection) or was a server error."""
        return self.reached and (self.status is None or self.status >= 500)

    @property
    def transient(self) -> bool:
        # An answer in a shape we cannot read will not read better next time; re-sending a
        # POST because of it could even buy twice.
        if self.unexpected_shape:
            return False
        return self.status is None or self.status in {408, 425, 429} or self.status >= 500


def _shape_error(endpoint: str) -> MosaicError:
    return MosaicError(502, f"{endpoint} answered an unexpected shape", unexpected_shape=True)


MAX_RETRY_AFTER = 3600.0


def _retry_after(value: str | None) -> float | None:
    """Seconds or an HTTP date; nonsense is ignored and an hour is the most we wait."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
            seconds = (when - datetime.now(UTC)).total_seconds()
        except (TypeError, ValueError):
            return None
    if seconds != seconds:  # NaN
        return None
    return min(max(0.0, seconds), MAX_RETRY_AFTER)


# The most of an answer we read: Mosaic's largest documented answer (a run's nodes) is a few
# kilobytes; anything near this is not an answer we can use, and is never buffered whole.
MAX_ANSWER_BYTES = 4 * 1024 * 1024


class _AnswerTooLarge(Exception):
    pass


async def _read_bounded(response: aiohttp.ClientResponse) -> bytes:
    """The answer's body, decompressed, refused past `MAX_ANSWER_BYTES` as it arrives."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_any():
        size += len(chunk)
        if size > MAX_ANSWER_BYTES:
            raise _AnswerTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _detail(body: bytes, reason: str | None) -> str:
    try:
        parsed = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace")[:500] or (reason or "")
    if isinstance(parsed, dict) and "detail" in parsed:
        return str(parsed["detail"])[:500]
    return str(parsed)[:500]


# Failures before any byte of the request could have reached Mosaic: the connection was never
# made (refused, unresolvable, TLS refused, or its connect timed out). Anything later may have
# reached it, and is treated as possibly acted on.
_NOT_REACHED = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)


def make_http_client(settings: Settings) -> aiohttp.ClientSession:
    """The process-wide session: explicit timeouts, a bounded pool, no redirects followed.

    aiohttp rather than httpx: a call costs about a tenth of httpx's CPU (measured against the
    sandbox: 0.08 ms against 1.0 ms per request), and the worker makes one or two per step.
    Proxies from the environment are honoured (`env_proxy`). Call inside the running loop.
    """
    timeout = aiohttp.ClientTimeout(
        total=settings.mosaic_timeout.total_seconds(),
        sock_connect=settings.mosaic_connect_timeout.total_seconds(),
    )
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=100, keepalive_timeout=5),
        timeout=timeout,
        headers={"User-Agent": "unblock/0.1"},
    )


def env_proxy(url: str) -> str | None:
    """The proxy the environment names for `url` (`HTTP_PROXY`/`HTTPS_PROXY`, `NO_PROXY`), as
    httpx honoured them, looked up once: aiohttp's own lookup (`trust_env`) reads the
    environment and `~/.netrc` again on every request, in a thread."""
    target = URL(url)
    if not target.host or urllib.request.proxy_bypass(target.host):
        return None
    return urllib.request.getproxies_environment().get(target.scheme or "")


class MosaicClient:
    """Mosaic's billing and run endpoints, for one organization's API key per call."""

    def __init__(self, http: aiohttp.ClientSession, base_url: str) -> None:
        self._http = http
        self._base_url = base_url.rstrip("/")
        self._proxy = env_proxy(self._base_url)

    async def _call(
        self, endpoint: str, method: str, path: str, api_key: str, payload: Any = None
    ) -> Any:
        started = time.perf_counter()
        with log_context.context(mosaic_call=endpoint):
            try:
                # `path` is percent-encoded already (`_segment`): sent as it is.
                async with self._http.request(
                    method,
                    URL(f"{self._base_url}{path}", encoded=True),
                    json=payload,
                    headers={"Authorization": f"Bearer {api_key}"},
                    allow_redirects=False,
                    proxy=self._proxy,
                ) as response:
                    status = response.status
                    try:
                        body = await _read_bounded(response)
                    except _AnswerTooLarge:
                        body = None
                    retry_after = response.headers.get("Retry-After")
                    reason = response.reason
            except (aiohttp.ClientError, TimeoutError) as exc:
                metrics.MOSAIC_CALLS.labels(endpoint, "unreachable").inc()
                log.warning("Mosaic %s unreachable: %s", endpoint, type(exc).__name__)
                raise MosaicError(
                    None,
                    f"{type(exc).__name__} calling {method} {endpoint}",
                    reached=not isinstance(exc, _NOT_REACHED),
                ) from exc
            finally:
                elapsed = time.perf_counter() - started
                metrics.MOSAIC_LATENCY.labels(endpoint).observe(elapsed)
            metrics.MOSAIC_CALLS.labels(endpoint, str(status)).inc()
            log.debug("Mosaic %s answered %s in %.3fs", endpoint, status, elapsed)
        if 200 <= status < 300:
            if body is None:
                raise MosaicError(
                    502, f"{endpoint} answered over {MAX_ANSWER_BYTES} bytes", unexpected_shape=True
                )
            try:
                return json.loads(body)
            except ValueError as exc:
                raise MosaicError(
                    502, f"{endpoint} answered non-JSON", unexpected_shape=True
                ) from exc
        too_large = f"an answer over {MAX_ANSWER_BYTES} bytes"
        detail = too_large if body is None else _detail(body, reason)
        raise MosaicError(status, detail, retry_after=_retry_after(retry_after))

    @staticmethod
    def _model(model: type[M], body: Any, endpoint: str) -> M:
        try:
            return model.model_validate(body)
        except ValidationError as exc:
            raise _shape_error(endpoint) from exc

    async def get_plan(self, api_key: str) -> PlanState:
        body = await self._call("GET /plan", "GET", "/plan", api_key)
        return self._model(PlanState, body, "GET /plan")

    async def list_plans(self, api_key: str) -> list[PlanOffer]:
        body = await self._call("GET /plan/list", "GET", "/plan/list", api_key)
        try:
            return parse_plan_list(body)
        except ValidationError as exc:
            raise _shape_error("GET /plan/list") from exc

    async def upgrade_plan(
        self,
        api_key: str,
        plan_id: str,
        *,
        success_url: str | None = None,
        cancel_url: str | None = None,
    ) -> UpgradeResult:
        body: dict[str, Any] = {"plan_id": plan_id}
        if success_url:
            body["success_url"] = success_url
        if cancel_url:
            body["cancel_url"] = cancel_url
        answer = await self._call("POST /plan/upgrade", "POST", "/plan/upgrade", api_key, body)
        return self._model(UpgradeResult, answer, "POST /plan/upgrade")

    async def get_credits(self, api_key: str) -> Credits:
        body = await self._call("GET /credits", "GET", "/credits", api_key)
        if not isinstance(body, dict):
            raise _shape_error("GET /credits")
        try:
            return parse_credits(body)
        except ValidationError as exc:
            raise _shape_error("GET /credits") from exc

    async def set_auto_topup(
        self, api_key: str, *, enabled: bool, threshold: int, quantity: int
    ) -> AutoTopup:
        body = {"auto_topup": {"enabled": enabled, "threshold": threshold, "quantity": quantity}}
        answer = await self._call(
            "POST /credits/settings", "POST", "/credits/settings", api_key, body
        )
        stored = answer.get("auto_topup") if isinstance(answer, dict) else None
        return self._model(AutoTopup, stored or body["auto_topup"], "POST /credits/settings")

    async def get_run(self, api_key: str, run_id: str) -> tuple[AgentRun, dict[str, Any]]:
        path = f"/agent_run/{_segment(run_id)}"
        body = await self._call("GET /agent_run", "GET", path, api_key)
        return self._model(AgentRun, body, "GET /agent_run"), body

    async def get_run_nodes(self, api_key: str, run_id: str) -> list[RunNode]:
        path = f"/agent_run/{_segment(run_id)}/nodes"
        body = await self._call("GET /agent_run/nodes", "GET", path, api_key)
        nodes = body.get("nodes", []) if isinstance(body, dict) else []
        return [self._model(RunNode, n, "GET /agent_run/nodes") for n in nodes]

    async def resume_run(self, api_key: str, run_id: str) -> dict[str, Any]:
        path = f"/agent_run/{_segment(run_id)}/resume"
        body = await self._call("POST /agent_run/resume", "POST", path, api_key)
        return body if isinstance(body, dict) else {}


def _segment(value: str) -> str:
    """Run ids come from webhooks and callers: keep them to one path segment.

    Percent-encoding keeps `/` and `?` inside the segment, but `.` and `..` are path steps
    whatever their encoding (URL normalisation folds %2E back), so they are refused outright."""
    if not value.strip("."):
        raise MosaicError(422, f"{value!r} cannot name a run")
    return quote(value, safe="")
