"""The guarantees, checked after the run from what unblock stored (PostgreSQL) and what Mosaic
saw (the sandbox's state and call log). Each check names the organizations or runs that break
it; none of them is relaxed for the faults injected."""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from bench.chaos.flows import ACTIVE, Kind, Org
from bench.chaos.gateway import ServerError

QUESTIONS = {"awaiting_choice": "choose_plan", "topup_prompt": "topup"}


@dataclass
class Check:
    name: str
    problems: list[str] = field(default_factory=list)
    figure: str = ""

    @property
    def passed(self) -> bool:
        return not self.problems


@dataclass
class Observed:
    """Everything the checks read, gathered once after the run settled."""

    orgs: list[Org]
    sandbox_orgs: dict[str, dict[str, Any]]  # organization_id → control-surface state
    calls: list[dict[str, Any]]
    episodes: list[asyncpg.Record]
    history: dict[str, list[asyncpg.Record]]  # blocked_run_id → rows in order
    pending_jobs: int
    server_errors: list[ServerError]
    outages: list[tuple[float, float]]
    lost_webhooks: list[str]


async def observe_database(
    url: str,
) -> tuple[list[asyncpg.Record], dict[str, list[asyncpg.Record]], int]:
    conn = await asyncpg.connect(url)
    try:
        episodes = await conn.fetch(
            "SELECT id::text, account_id::text, run_id, state, error_code FROM blocked_runs"
        )
        rows = await conn.fetch(
            "SELECT blocked_run_id::text AS run, from_state, to_state, actor, created_at"
            " FROM blocked_run_history ORDER BY id"
        )
        pending = await conn.fetchval("SELECT count(*) FROM jobs WHERE status = 'pending'")
    finally:
        await conn.close()
    history: dict[str, list[asyncpg.Record]] = defaultdict(list)
    for row in rows:
        history[row["run"]].append(row)
    return episodes, history, int(pending)


def dump(seen: Observed) -> dict[str, Any]:
    """What a failed run leaves behind for diagnosis: each organization's story and calls."""
    out = []
    for org in seen.orgs:
        mine = [e for e in seen.episodes if e["account_id"] == org.account_id]
        out.append(
            {
                "org": org.index,
                "kind": org.kind.value,
                "account_id": org.account_id,
                "runs": org.run_ids,
                "registered": org.registered,
                "answers": dict(org.answers),
                "surprises": org.surprises,
                "sandbox_runs": [
                    {k: r[k] for k in ("run_id", "status", "resumes")}
                    for r in seen.sandbox_orgs.get(org.organization_id, {}).get("runs", [])
                ],
                "episodes": [
                    {
                        "id": e["id"],
                        "run_id": e["run_id"],
                        "state": e["state"],
                        "error": e["error_code"],
                        "history": [
                            f"{h['created_at'].time()} {h['from_state']}→{h['to_state']}"
                            f" by {h['actor']}"
                            for h in seen.history.get(e["id"], [])
                        ],
                    }
                    for e in mine
                ],
                "calls": [
                    f"{c['time'][11:23]} {c['method']} {c['path']} {c['status']}"
                    f" {c['fault'] or ''} {c.get('applied_status') or ''}".rstrip()
                    for c in seen.calls
                    if c["api_key"] == org.api_key
                ],
            }
        )
    return {"orgs": out}


def _applied(call: dict[str, Any], status: int = 200) -> bool:
    """Mosaic carried the call out with this status (whatever the caller was told)."""
    if call.get("applied_status") is not None:
        return bool(call["applied_status"] == status)
    return call["status"] == status and call["fault"] in (None, "latency")


def check_all(seen: Observed) -> list[Check]:
    by_key = {org.api_key: org for org in seen.orgs}
    by_account = {org.account_id: org for org in seen.orgs}
    episodes_of: dict[tuple[str, str], list[asyncpg.Record]] = defaultdict(list)
    for episode in seen.episodes:
        episodes_of[(episode["account_id"], episode["run_id"])].append(episode)

    upgrades: Counter[str] = Counter()
    settings: Counter[str] = Counter()
    resumes: Counter[str] = Counter()
    for call in seen.calls:
        org = by_key.get(call["api_key"])
        if org is None or call["method"] != "POST":
            continue
        if call["path"] == "/plan/upgrade" and _applied(call):
            upgrades[org.account_id] += 1
        elif call["path"] == "/credits/settings" and _applied(call):
            settings[org.account_id] += 1
        elif call["path"].endswith("/resume") and _applied(call):
            resumes[call["path"].split("/")[2]] += 1

    checks: list[Callable[[], Check]] = [
        lambda: _terminal(seen, episodes_of),
        lambda: _one_episode_per_block(seen, episodes_of),
        lambda: _one_resume_per_episode(seen, episodes_of, resumes),
        lambda: _one_purchase(seen, upgrades),
        lambda: _one_settings_write(seen, settings),
        lambda: _no_question_twice(seen, by_account),
        lambda: _nothing_stuck(seen),
        lambda: _no_5xx_outside_outage(seen),
        lambda: _history_chains(seen),
        lambda: _every_webhook_acknowledged(seen),
    ]
    return [check() for check in checks]


def _runs(seen: Observed) -> list[tuple[Org, dict[str, Any]]]:
    out = []
    for org in seen.orgs:
        state = seen.sandbox_orgs.get(org.organization_id, {"runs": []})
        out += [(org, run) for run in state["runs"] if run["run_id"] in org.run_ids]
    return out


def _blocks(run: dict[str, Any]) -> int:
    # Mosaic only resumes a failed run, and nothing else here resumes or cancels: every resume
    # followed one block, and a run that ended failed blocked once more.
    return int(run["resumes"]) + (1 if run["status"] == "failed" else 0)


def _terminal(seen: Observed, episodes_of: dict[tuple[str, str], list[Any]]) -> Check:
    check = Check("every run reaches the terminal state its path implies (resumed, completed)")
    runs = _runs(seen)
    for org, run in runs:
        if run["status"] != "completed":
            check.problems.append(f"{org.kind} run {run['run_id']}: Mosaic says {run['status']}")
        for episode in episodes_of[(org.account_id, run["run_id"])]:
            if episode["state"] != "resumed":
                check.problems.append(
                    f"{org.kind} run {run['run_id']}: episode {episode['id']} ended"
                    f" {episode['state']} ({episode['error_code']})"
                )
    missing = sum(len(org.run_ids) for org in seen.orgs) - len(runs)
    if missing:
        check.problems.append(f"{missing} runs unknown to the sandbox")
    check.figure = f"{len(runs)} runs"
    return check


def _one_episode_per_block(seen: Observed, episodes_of: dict[tuple[str, str], list[Any]]) -> Check:
    check = Check("exactly one episode per block")
    blocks = 0
    for org, run in _runs(seen):
        blocks += _blocks(run)
        episodes = len(episodes_of[(org.account_id, run["run_id"])])
        if episodes != _blocks(run):
            check.problems.append(
                f"{org.kind} run {run['run_id']}: {_blocks(run)} blocks, {episodes} episodes"
            )
    check.figure = f"{blocks} blocks"
    return check


def _one_resume_per_episode(
    seen: Observed, episodes_of: dict[tuple[str, str], list[Any]], resumes: Counter[str]
) -> Check:
    check = Check("exactly one successful resume per episode")
    for org, run in _runs(seen):
        resumed = [
            e for e in episodes_of[(org.account_id, run["run_id"])] if e["state"] == "resumed"
        ]
        if resumes[run["run_id"]] != len(resumed) or run["resumes"] != len(resumed):
            check.problems.append(
                f"{org.kind} run {run['run_id']}: {len(resumed)} episodes resumed,"
                f" {resumes[run['run_id']]} resumes accepted by Mosaic"
            )
    check.figure = f"{sum(resumes.values())} resumes"
    return check


def _one_purchase(seen: Observed, upgrades: Counter[str]) -> Check:
    """Money changes hands once per decision: an immediate upgrade Mosaic applied, or a hosted
    checkout the person paid. An extra checkout *opened* is no purchase (nobody pays it; it
    happens when a process dies between Mosaic applying the request and the answer being
    kept): it is shown, not failed."""
    check = Check("at most one purchase per organization decision")
    extra_open = 0
    for org in seen.orgs:
        checkouts = seen.sandbox_orgs.get(org.organization_id, {}).get("checkouts", [])
        if org.kind is Kind.FREE_CHECKOUT:
            bought = sum(1 for c in checkouts if c.get("status") == "paid")
            extra_open += max(0, len(checkouts) - 1)
        else:
            bought = upgrades[org.account_id]
        expected = 1 if org.kind in (Kind.FREE_CHECKOUT, Kind.FREE_IMMEDIATE) else 0
        if bought != expected:
            check.problems.append(
                f"{org.kind} org {org.index}: {bought} upgrades bought (expected {expected})"
            )
    purchases = sum(
        sum(1 for c in seen.sandbox_orgs.get(o.organization_id, {}).get("checkouts", [])
            if c.get("status") == "paid")
        if o.kind is Kind.FREE_CHECKOUT else upgrades[o.account_id]
        for o in seen.orgs
    )  # fmt: skip
    check.figure = f"{purchases} purchases; {extra_open} extra checkouts opened, none paid"
    return check


def _one_settings_write(seen: Observed, settings: Counter[str]) -> Check:
    check = Check("at most one settings write per answer")
    for org in seen.orgs:
        if settings[org.account_id] > org.enable_answers or settings[org.account_id] > 1:
            check.problems.append(
                f"{org.kind} org {org.index}: {settings[org.account_id]} settings writes for"
                f" {org.enable_answers} answers to enable auto top-up"
            )
        elif settings[org.account_id] < min(org.enable_answers, 1):
            check.problems.append(f"{org.kind} org {org.index}: enable answer never written")
    check.figure = f"{sum(settings.values())} writes"
    return check


def _no_question_twice(seen: Observed, by_account: dict[str, Org]) -> Check:
    check = Check("no question asked twice")
    answered_in_db: Counter[tuple[str, str]] = Counter()
    for episode in seen.episodes:
        for row in seen.history.get(episode["id"], []):
            if row["from_state"] in QUESTIONS and str(row["actor"]).startswith("user:"):
                answered_in_db[(episode["account_id"], QUESTIONS[row["from_state"]])] += 1
    for org in seen.orgs:
        free = org.kind in (Kind.FREE_CHECKOUT, Kind.FREE_IMMEDIATE)
        expected = {
            "choose_plan": 1 if free else 0,
            "topup": 0 if org.kind is Kind.PAID_AUTO_TOPUP else 1,
        }
        for question, n in expected.items():
            given = org.answers[question]
            stored = answered_in_db[(org.account_id, question)]
            if given != n or stored > 1:
                check.problems.append(
                    f"{org.kind} org {org.index}: {question} answered {given} times"
                    f" ({stored} in history), expected {n}"
                )
    check.figure = f"{sum(sum(o.answers.values()) for o in seen.orgs)} answers"
    return check


def _nothing_stuck(seen: Observed) -> Check:
    check = Check("no run stuck")
    for episode in seen.episodes:
        if episode["state"] in ACTIVE:
            check.problems.append(f"episode {episode['id']} still {episode['state']}")
    if seen.pending_jobs:
        check.problems.append(f"{seen.pending_jobs} steps still pending")
    for org in seen.orgs:
        check.problems += [f"{org.kind} org {org.index}: {s}" for s in org.surprises]
    return check


def _no_5xx_outside_outage(seen: Observed) -> Check:
    check = Check("no API 5xx outside the database outage")
    inside = 0
    for error in seen.server_errors:
        if any(start <= error.at <= end for start, end in seen.outages):
            inside += 1
        else:
            check.problems.append(f"{error.status} on {error.method} {error.path}")
    check.figure = f"{inside} inside the outage"
    return check


def _history_chains(seen: Observed) -> Check:
    check = Check("history chains valid")
    for episode in seen.episodes:
        rows = seen.history.get(episode["id"], [])
        if not rows:
            check.problems.append(f"episode {episode['id']}: no history")
            continue
        if rows[0]["from_state"] is not None:
            check.problems.append(f"episode {episode['id']}: starts from {rows[0]['from_state']}")
        for before, after in itertools.pairwise(rows):
            if after["from_state"] != before["to_state"]:
                check.problems.append(
                    f"episode {episode['id']}: {before['to_state']} then"
                    f" {after['from_state']}→{after['to_state']}"
                )
        if rows[-1]["to_state"] != episode["state"]:
            check.problems.append(
                f"episode {episode['id']}: is {episode['state']}, history ends"
                f" {rows[-1]['to_state']}"
            )
    check.figure = f"{sum(len(r) for r in seen.history.values())} rows"
    return check


def _every_webhook_acknowledged(seen: Observed) -> Check:
    check = Check("every webhook delivery acknowledged (202)")
    check.problems += seen.lost_webhooks
    return check
