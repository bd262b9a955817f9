"""Prometheus metrics, served at /metrics."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

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
NOTIFY_DELIVERIES = Counter(
    "unblock_notification_attempts_total",
    "Attempts to deliver outbound notifications, by outcome (delivered, failed, gave_up).",
    ["outcome"],
)
NOTIFY_ATTEMPT_SECONDS = Histogram(
    "unblock_notification_attempt_seconds", "Duration of one outbound notification attempt."
)
NOTIFY_OLDEST_UNDELIVERED = Gauge(
    "unblock_notification_oldest_undelivered_seconds",
    "Age of the oldest outbound notification not delivered yet (0: none waiting).",
)
