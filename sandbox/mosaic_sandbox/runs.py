"""Agent runs: nodes that spend credits one after another, fail for lack of them, resume.

A run's N nodes execute in order, `step_delay` seconds each. A node spends its credits when it
finishes; if the balance cannot cover it (after auto top-up had its chance) the node fails with
`needs_credits` and the run finishes `failed` with "Insufficient credits" — the credit-blocked
run Mosaic documents. Every status change is reported to the run's `callback_url`.

Node statuses used: `queued` (scheduled), `running`, `completed`, `failed`, `not_started` (a
failure de-scheduled it), `cancelled`. `node_status_counts.in_progress` counts queued and running
nodes, which matches both documented examples (RUN_STARTED's 1/5/0 and RUN_FINISHED's 3/0/1).
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from mosaic_sandbox import billing
from mosaic_sandbox.clock import iso, now
from mosaic_sandbox.errors import ApiError
from mosaic_sandbox.state import (
    Node,
    NodeStatus,
    Organization,
    Render,
    Run,
    RunStatus,
    Sandbox,
    Tile,
)

INSUFFICIENT_CREDITS = "Insufficient credits"
RENDER_HOST = "https://renders.mosaic-sandbox.invalid"
RESUMABLE_NODE_STATUSES = frozenset(
    {NodeStatus.NOT_STARTED, NodeStatus.BLOCKED, NodeStatus.CANCELLED, NodeStatus.FAILED}
)


def _tile(name: str, slug: str) -> Tile:
    docs_url = f"https://docs.mosaic.so/tiles/{slug}"
    return Tile(
        # Stable across sandboxes and seeds: a node type's id is a property of the type.
        node_type_id=str(uuid.uuid5(uuid.NAMESPACE_URL, docs_url)),
        node_type_name=name,
        docs_url=docs_url,
        params_docs_url=f"{docs_url}#api-info",
    )


TILES = (
    _tile("Transcribe", "transcribe"),
    _tile("Captions", "captions"),
    _tile("AI Music", "ai-music"),
    _tile("Reframe", "reframe"),
    _tile("Render", "render"),
)


def start_run(
    sandbox: Sandbox,
    org: Organization,
    *,
    agent_id: str,
    callback_url: str | None,
    video_urls: list[str],
) -> Run:
    """Create a run with the organization's node count and start executing it."""
    started = now()
    nodes = [
        Node(
            agent_node_id=sandbox.new_uuid(),
            original_node_id=sandbox.new_uuid(),
            # The last node always renders, so a finished run has an output to show.
            tile=TILES[-1] if index == org.nodes_per_run - 1 else TILES[index % (len(TILES) - 1)],
        )
        for index in range(org.nodes_per_run)
    ]
    run = Run(
        id=sandbox.new_uuid(),
        agent_id=agent_id,
        organization_id=org.id,
        callback_url=callback_url,
        inputs=[
            {"video_url": url, "thumbnail_url": f"{RENDER_HOST}/inputs/{index}.jpg"}
            for index, url in enumerate(video_urls)
        ],
        nodes=nodes,
        started_at=started,
        updated_at=started,
    )
    sandbox.runs[run.id] = run
    _launch(sandbox, run)
    return run


def resume_run(sandbox: Sandbox, run: Run) -> dict[str, Any]:
    """Re-queue the nodes that did not finish and carry on; only failed or cancelled runs."""
    if run.status not in (RunStatus.FAILED, RunStatus.CANCELLED):
        raise ApiError(
            409,
            f"Agent run cannot be resumed: status is {run.status.value!r}, "
            "expected 'failed' or 'cancelled'",
        )
    requeued = [node for node in run.nodes if node.status in RESUMABLE_NODE_STATUSES]
    detached = sum(node.status in (NodeStatus.FAILED, NodeStatus.CANCELLED) for node in requeued)
    for node in requeued:
        node.status = NodeStatus.QUEUED
        node.status_message = None
        node.errors = []
        node.needs_credits = False
    run.status = RunStatus.RUNNING
    run.status_message = None
    run.resumes += 1
    run.updated_at = now()
    _launch(sandbox, run)
    return {
        "success": True,
        "run_id": run.id,
        "agent_state_id": run.id,
        "nodes_queued": len(requeued),
        "nodes_considered": len(run.nodes),
        "requeued_nodes": len(requeued),
        "requeued_node_tasks_detached": detached,
        # The sandbox never has tasks left running on a failed or cancelled run.
        "requeued_node_active_tasks_cancelled": 0,
        "requeued_node_active_tasks_total": 0,
    }


def cancel_run(run: Run) -> dict[str, Any]:
    """Stop a running run; its unfinished nodes become `cancelled` (resumable)."""
    if run.status is not RunStatus.RUNNING:
        raise ApiError(409, f"Agent run is not running (status {run.status.value!r})")
    if run.task is not None:
        run.task.cancel()
    tasks_cancelled = sum(node.status is NodeStatus.RUNNING for node in run.nodes)
    reset = [n for n in run.nodes if n.status in (NodeStatus.RUNNING, NodeStatus.QUEUED)]
    for node in reset:
        node.status = NodeStatus.CANCELLED
    run.status = RunStatus.CANCELLED
    run.status_message = "Cancelled by user"
    run.updated_at = now()
    # No webhook: RUN_FINISHED's documented statuses do not include `cancelled` (§7).
    return {
        "success": True,
        "run_id": run.id,
        "tasks_cancelled": tasks_cancelled,
        "nodes_reset": len(reset),
        "message": "Agent run cancelled successfully",
    }


def _launch(sandbox: Sandbox, run: Run) -> None:
    _notify(sandbox, run, started_payload(run))
    run.task = asyncio.create_task(_execute(sandbox, run), name=f"run-{run.id}")


async def _execute(sandbox: Sandbox, run: Run) -> None:
    for node in run.nodes:
        if node.status is not NodeStatus.QUEUED:
            continue
        _set_node(sandbox, run, node, NodeStatus.RUNNING)
        await asyncio.sleep(sandbox.step_delay)
        # Read the organization now, not at start: tests change balance and cost mid-run.
        org = sandbox.organizations[run.organization_id]
        if not billing.charge(org, org.node_cost):
            node.status_message = INSUFFICIENT_CREDITS
            node.errors = [INSUFFICIENT_CREDITS]
            node.needs_credits = True
            for later in run.nodes:
                if later.status is NodeStatus.QUEUED:
                    later.status = NodeStatus.NOT_STARTED
            _set_node(sandbox, run, node, NodeStatus.FAILED)
            _finish(sandbox, run, RunStatus.FAILED, INSUFFICIENT_CREDITS)
            return
        if node is run.nodes[-1]:
            node.render = _render(sandbox, node)
        _set_node(sandbox, run, node, NodeStatus.COMPLETED)
    _finish(sandbox, run, RunStatus.COMPLETED, None)


def _set_node(sandbox: Sandbox, run: Run, node: Node, status: NodeStatus) -> None:
    node.status = status
    run.updated_at = now()
    _notify(sandbox, run, progress_payload(run, [node]))


def _finish(sandbox: Sandbox, run: Run, status: RunStatus, message: str | None) -> None:
    run.status = status
    run.status_message = message
    run.updated_at = now()
    org = sandbox.organizations[run.organization_id]
    _notify(sandbox, run, finished_payload(run, org))


def _notify(sandbox: Sandbox, run: Run, payload: dict[str, Any]) -> None:
    if run.callback_url is None:
        return
    org = sandbox.organizations[run.organization_id]
    sandbox.webhooks.enqueue(
        run_id=run.id, url=run.callback_url, payload=payload, secret=org.webhook_secret
    )


def _render(sandbox: Sandbox, node: Node) -> Render:
    render_id = sandbox.new_uuid()
    return Render(
        id=render_id,
        video_url=f"{RENDER_HOST}/renders/{render_id}.mp4?expires_in=604800",
        thumbnail_url=f"{RENDER_HOST}/renders/{render_id}.jpg",
        premiere_prproj_url=f"{RENDER_HOST}/renders/{render_id}/timeline.zip",
        completed_at=now(),
        original_node_id=node.original_node_id,
    )


# --- Shapes, as Mosaic answers them (docs/mosaic.md) ------------------------------------------


def node_status_counts(run: Run) -> dict[str, int]:
    statuses = [node.status for node in run.nodes]
    return {
        "completed": sum(
            s in (NodeStatus.COMPLETED, NodeStatus.PARTIAL_COMPLETE) for s in statuses
        ),
        "in_progress": sum(s in (NodeStatus.QUEUED, NodeStatus.RUNNING) for s in statuses),
        "failed": statuses.count(NodeStatus.FAILED),
    }


def run_errors(run: Run) -> list[dict[str, Any]]:
    return [
        {"original_node_id": node.original_node_id, "messages": list(node.errors)}
        for node in run.nodes
        if node.errors
    ]


def render_view(render: Render, *, with_project: bool) -> dict[str, Any]:
    view: dict[str, Any] = {
        "id": render.id,
        "video_url": render.video_url,
        "thumbnail_url": render.thumbnail_url,
    }
    if with_project:
        # Only GET /agent_run documents the Premiere project link; webhook outputs omit it.
        view["premiere_prproj_url"] = render.premiere_prproj_url
    view["completed_at"] = iso(render.completed_at)
    view["original_node_id"] = render.original_node_id
    return view


def started_run_view(run: Run) -> dict[str, Any]:
    """The answer to POST /agent/{agent_id}/run (the list endpoints' run shape)."""
    return {
        "run_id": run.id,
        "agent_id": run.agent_id,
        "status": run.status.value,
        "status_message": run.status_message,
        "started_at": iso(run.started_at),
        "updated_at": iso(run.updated_at),
        "node_status_counts": node_status_counts(run),
        "inputs": run.inputs,
        "outputs": [render_view(r, with_project=False) for r in run.renders],
        "triggered_by": None,
    }


def run_view(run: Run, org: Organization) -> dict[str, Any]:
    """GET /agent_run/{run_id}; the newest copy has no `run_id` (it is the path parameter)."""
    return {
        "agent_id": run.agent_id,
        "started_at": iso(run.started_at),
        "status": run.status.value,
        "status_message": run.status_message,
        org.needs_credits_key: run.needs_credits,
        "errors": run_errors(run),
        "node_status_counts": node_status_counts(run),
        "inputs": run.inputs,
        "outputs": [render_view(r, with_project=True) for r in run.renders],
    }


def nodes_view(run: Run, org: Organization) -> dict[str, Any]:
    return {
        "run_id": run.id,
        "nodes": [
            {
                "agent_node_id": node.agent_node_id,
                "original_node_id": node.original_node_id,
                "status": node.status.value,
                "status_message": node.status_message,
                "errors": list(node.errors),
                "node_type": {
                    "node_type_id": node.tile.node_type_id,
                    "node_type_name": node.tile.node_type_name,
                    "docs_url": node.tile.docs_url,
                    "params_docs_url": node.tile.params_docs_url,
                },
                org.needs_credits_key: node.needs_credits,
            }
            for node in run.nodes
        ],
    }


def started_payload(run: Run) -> dict[str, Any]:
    return {
        "flag": "RUN_STARTED",
        "agent_id": run.agent_id,
        "run_id": run.id,
        "status": run.status.value,
        "inputs": run.inputs,
        "node_status_counts": node_status_counts(run),
        "triggered_by": None,
    }


def progress_payload(run: Run, updated: list[Node]) -> dict[str, Any]:
    return {
        "flag": "RUN_PROGRESS",
        "agent_id": run.agent_id,
        "run_id": run.id,
        "status": run.status.value,
        "node_status_counts": node_status_counts(run),
        "updated_nodes": [
            {
                "original_node_id": node.original_node_id,
                "status": node.status.value,
                "status_message": node.status_message,
                "errors": list(node.errors),
                "outputs": []
                if node.render is None
                else [render_view(node.render, with_project=False)],
            }
            for node in updated
        ],
        "triggered_by": None,
    }


def finished_payload(run: Run, org: Organization) -> dict[str, Any]:
    return {
        "flag": "RUN_FINISHED",
        "agent_id": run.agent_id,
        "run_id": run.id,
        "status": run.status.value,
        "status_message": run.status_message,
        "node_status_counts": node_status_counts(run),
        org.needs_credits_key: run.needs_credits,
        "errors": run_errors(run),
        "inputs": run.inputs,
        "outputs": [render_view(r, with_project=False) for r in run.renders],
        "triggered_by": None,
    }
