"""Prometheus metrics, served at /metrics."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

WEBHOOKS = Counter("unblock_webhooks_total", "Mosaic webhooks received, by outcome.", ["outcome"])
TRANSITIONS = Counter(
    "unblock_transitions_total", "State changes of blocked runs.", ["from_state", "to_state"]
)
MOSAIC_CALLS = Counter(
    "unblock_mosaic_calls_total",
    "Calls made to Mosaic, by endpoint and status.",
    ["endpoint", "status"],
)
MOSAIC_LATENCY = Histogram(
    "unblock_mosaic_call_seconds", "Latency of calls to Mosaic.", ["endpoint"]
)
JOBS = Counter(
    "unblock_jobs_total", "Pending-work attempts, by kind and outcome.", ["kind", "outcome"]
)
