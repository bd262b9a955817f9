"""The alert rules under deploy/monitoring/ watch metrics the service really exports."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from prometheus_client import REGISTRY

import app.main  # noqa: F401  (registers every metric)

RULES = Path(__file__).resolve().parent.parent / "deploy" / "monitoring" / "prometheus-rules.yaml"
APP = Path(__file__).resolve().parent.parent / "app"


def _rules() -> list[dict[str, object]]:
    doc = yaml.safe_load(RULES.read_text())
    assert doc["kind"] == "PrometheusRule"
    return [rule for group in doc["spec"]["groups"] for rule in group["rules"]]


def _exported() -> dict[str, set[str]]:
    """Sample names the process exports, with the label names each carries."""
    names: dict[str, set[str]] = {}
    for family in REGISTRY.collect():
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
        if family.type == "counter":
            names.setdefault(f"{family.name}_total", set())
    return names


def test_alerts_cover_the_signals_operators_are_told_to_watch() -> None:
    exprs = " ".join(str(rule["expr"]) for rule in _rules())
    for outcome in ("retry", "gave_up", "lease_lost"):
        assert f'unblock_jobs_total{{outcome="{outcome}"}}' in exprs
    assert 'unblock_webhooks_total{outcome="unauthorized"}' in exprs


def test_every_alert_names_an_exported_metric_and_an_outcome_the_code_records() -> None:
    exported = _exported()
    source = "\n".join(p.read_text() for p in APP.rglob("*.py"))
    for rule in _rules():
        assert rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}  # type: ignore[index]
        for metric, labels in re.findall(r"(unblock_\w+)\{([^}]*)\}", str(rule["expr"])):
            assert metric in exported, f"{rule['alert']}: {metric} is not exported"
            for name, value in re.findall(r'(\w+)="([^"]*)"', labels):
                assert f'"{value}"' in source, f"{rule['alert']}: no code records {name}={value}"
