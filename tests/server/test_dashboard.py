"""The Grafana dashboard parses, and every metric its PromQL uses is one the server exports."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from amulet_core.engine.protocol import EngineStats
from server.metrics import PrometheusMetrics
from server.observer import RequestRecord
from tests.support import ROOT

DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "amulet.json"
METRIC = re.compile(r"\bamulet_[A-Za-z0-9_]+")
SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "counter": ("_total",)}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # panels inside collapsed rows


def _queries(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in _panels(dashboard["panels"]) for t in p.get("targets", []) if "expr" in t]
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        exprs.append(query["query"] if isinstance(query, dict) else str(query or ""))
    return exprs


@pytest.fixture(scope="module")
def exported() -> set[str]:
    """Every series name a real PrometheusMetrics exposes (with _bucket/_sum/_count/_total forms)."""
    metrics = PrometheusMetrics("m", lambda: EngineStats(kv_blocks_total=4, kv_blocks_used=1))
    for method in ("base", "pref", "la", "amulet"):
        metrics.request_finished(RequestRecord(method, "stop", 3, 2, 0.2, 0.05, 0.01, (0.02,)))
    metrics.step_observed(0.01, 1)
    names: set[str] = set()
    for family in text_string_to_metric_families(metrics.render().decode()):
        names.add(family.name)
        names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ()))
        names.update(sample.name for sample in family.samples)
    return names


def test_dashboard_is_a_grafana_dashboard(dashboard: dict[str, Any]) -> None:
    assert dashboard["title"]
    assert dashboard["uid"]
    panels = list(_panels(dashboard["panels"]))
    assert panels
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert {"x", "y", "w", "h"} <= panel["gridPos"].keys()
        for target in panel.get("targets", []):
            assert target["datasource"]["type"] == "prometheus"


def test_every_queried_metric_is_exported(dashboard: dict[str, Any], exported: set[str]) -> None:
    used = {name for expr in _queries(dashboard) for name in METRIC.findall(expr)}
    assert used, "the dashboard queries no amulet_ metric"
    unknown = sorted(used - exported)
    assert not unknown, f"dashboard uses metrics the server does not export: {unknown}"


def test_dashboard_covers_the_operator_panels(dashboard: dict[str, Any]) -> None:
    exprs = _queries(dashboard)
    joined = "\n".join(exprs)

    def has(pattern: str) -> bool:
        return re.search(pattern, joined) is not None

    assert has(r"histogram_quantile\(0\.5, .*amulet_time_to_first_token_seconds_bucket")
    assert has(r"histogram_quantile\(0\.95, .*amulet_time_to_first_token_seconds_bucket")
    assert has(r"amulet_inter_token_latency_seconds_bucket")
    assert has(r"rate\(amulet_generation_tokens_total")
    assert has(r"amulet_requests_running") and has(r"amulet_requests_waiting")
    assert has(r"amulet_kv_cache_usage_ratio")
    # amulet vs base: a latency query grouped by the method label
    assert any("amulet_e2e_request_latency_seconds" in e and "by (method)" in e.replace("le, ", "") for e in exprs)
    assert has(r'method="amulet"') and has(r'method="base"')
