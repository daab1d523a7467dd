"""PrometheusMetrics: records fed in come out of the text exposition with the right names, labels and counts."""

from __future__ import annotations

import threading

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from amulet_core.engine.protocol import EngineStats
from server.metrics import PrometheusMetrics, mount_metrics
from server.observer import RequestObserver, RequestRecord

MODEL = "test-model"


def _samples(metrics: PrometheusMetrics) -> list[Sample]:
    text = metrics.render().decode()
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def _value(samples: list[Sample], name: str, **labels: str) -> float:
    matches = [s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(matches) == 1, f"expected one sample {name}{labels}, got {matches}"
    return matches[0]


def _bucket(samples: list[Sample], name: str, le: str, **labels: str) -> float:
    return _value(samples, f"{name}_bucket", le=le, **labels)


@pytest.fixture
def stats_box() -> dict[str, EngineStats]:
    return {"stats": EngineStats()}


@pytest.fixture
def metrics(stats_box: dict[str, EngineStats]) -> PrometheusMetrics:
    return PrometheusMetrics(MODEL, lambda: stats_box["stats"])


def _record(method: str, finish: str = "stop", **kw: object) -> RequestRecord:
    fields: dict[str, object] = dict(
        method=method, finish_reason=finish, prompt_tokens=10, completion_tokens=4,
        e2e_s=0.5, ttft_s=0.05, queue_s=0.002, inter_token_s=(0.01, 0.02, 0.03),
    )  # fmt: skip
    fields.update(kw)
    return RequestRecord(**fields)  # type: ignore[arg-type]


def test_is_a_request_observer(metrics: PrometheusMetrics) -> None:
    observer: RequestObserver = metrics
    observer.request_finished(_record("base"))


def test_request_records_fill_histograms_and_counters(metrics: PrometheusMetrics) -> None:
    metrics.request_finished(_record("amulet"))
    metrics.request_finished(_record("amulet", "length", prompt_tokens=7, completion_tokens=16, ttft_s=2.0))
    metrics.request_finished(_record("base", prompt_tokens=3, completion_tokens=1, inter_token_s=()))
    s = _samples(metrics)
    amulet = {"model": MODEL, "method": "amulet"}
    base = {"model": MODEL, "method": "base"}

    assert _value(s, "amulet_requests_total", finish_reason="stop", **amulet) == 1
    assert _value(s, "amulet_requests_total", finish_reason="length", **amulet) == 1
    assert _value(s, "amulet_requests_total", finish_reason="stop", **base) == 1
    assert _value(s, "amulet_requests_total", finish_reason="error", **base) == 0

    assert _value(s, "amulet_prompt_tokens_total", **amulet) == 17
    assert _value(s, "amulet_generation_tokens_total", **amulet) == 20
    assert _value(s, "amulet_prompt_tokens_total", **base) == 3
    assert _value(s, "amulet_generation_tokens_total", **base) == 1

    assert _value(s, "amulet_time_to_first_token_seconds_count", **amulet) == 2
    assert _value(s, "amulet_time_to_first_token_seconds_sum", **amulet) == pytest.approx(2.05)
    assert _bucket(s, "amulet_time_to_first_token_seconds", "0.1", **amulet) == 1
    assert _bucket(s, "amulet_time_to_first_token_seconds", "+Inf", **amulet) == 2
    assert _value(s, "amulet_time_to_first_token_seconds_count", **base) == 1

    # every inter-token gap is one observation
    assert _value(s, "amulet_inter_token_latency_seconds_count", **amulet) == 6
    assert _value(s, "amulet_inter_token_latency_seconds_sum", **amulet) == pytest.approx(0.12)
    assert _value(s, "amulet_inter_token_latency_seconds_count", **base) == 0

    assert _value(s, "amulet_e2e_request_latency_seconds_count", **amulet) == 2
    assert _value(s, "amulet_request_queue_time_seconds_count", **base) == 1
    assert _value(s, "amulet_request_prompt_tokens_sum", **amulet) == 17
    assert _value(s, "amulet_request_generation_tokens_count", **amulet) == 2
    assert _bucket(s, "amulet_request_generation_tokens", "5.0", **amulet) == 1


def test_missing_or_invalid_times_are_not_observed(metrics: PrometheusMetrics) -> None:
    gaps = (float("nan"), -1.0, 0.01)
    metrics.request_finished(_record("pref", "abort", ttft_s=None, queue_s=None, inter_token_s=gaps))
    s = _samples(metrics)
    pref = {"model": MODEL, "method": "pref"}
    assert _value(s, "amulet_requests_total", finish_reason="abort", **pref) == 1
    assert _value(s, "amulet_time_to_first_token_seconds_count", **pref) == 0
    assert _value(s, "amulet_request_queue_time_seconds_count", **pref) == 0
    assert _value(s, "amulet_inter_token_latency_seconds_count", **pref) == 1
    assert _value(s, "amulet_e2e_request_latency_seconds_count", **pref) == 1


def test_every_method_and_finish_reason_series_exists_before_traffic(metrics: PrometheusMetrics) -> None:
    s = _samples(metrics)
    for method in ("base", "pref", "la", "amulet"):
        assert _value(s, "amulet_time_to_first_token_seconds_count", model=MODEL, method=method) == 0
        for reason in ("stop", "length", "abort", "error"):
            assert _value(s, "amulet_requests_total", model=MODEL, method=method, finish_reason=reason) == 0


def test_unknown_labels_are_bucketed_as_other(metrics: PrometheusMetrics) -> None:
    metrics.request_finished(_record("made-up", "weird"))
    s = _samples(metrics)
    assert _value(s, "amulet_requests_total", model=MODEL, method="other", finish_reason="other") == 1
    assert not any(s_.labels.get("method") == "made-up" for s_ in s)


def test_engine_steps_from_many_threads(metrics: PrometheusMetrics) -> None:
    def worker() -> None:
        for _ in range(250):
            metrics.step_observed(0.004, 3)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = _samples(metrics)
    assert _value(s, "amulet_engine_step_duration_seconds_count", model=MODEL) == 1000
    assert _value(s, "amulet_engine_step_duration_seconds_sum", model=MODEL) == pytest.approx(4.0)
    assert _bucket(s, "amulet_engine_step_duration_seconds", "0.005", model=MODEL) == 1000
    assert _bucket(s, "amulet_engine_step_duration_seconds", "0.0025", model=MODEL) == 0
    assert _value(s, "amulet_engine_step_sequences_sum", model=MODEL) == 3000


def test_engine_stats_are_read_at_scrape_time(metrics: PrometheusMetrics, stats_box: dict[str, EngineStats]) -> None:
    stats_box["stats"] = EngineStats(
        running_requests=3, waiting_requests=5, kv_blocks_total=200, kv_blocks_used=50,
        prefix_cache_queries=40, prefix_cache_hits=30,
    )  # fmt: skip
    s = _samples(metrics)
    assert _value(s, "amulet_requests_running", model=MODEL) == 3
    assert _value(s, "amulet_requests_waiting", model=MODEL) == 5
    assert _value(s, "amulet_kv_cache_usage_ratio", model=MODEL) == pytest.approx(0.25)
    assert _value(s, "amulet_prefix_cache_queries_total", model=MODEL) == 40
    assert _value(s, "amulet_prefix_cache_hits_total", model=MODEL) == 30

    stats_box["stats"] = EngineStats(running_requests=1, prefix_cache_queries=41, prefix_cache_hits=30)
    s = _samples(metrics)
    assert _value(s, "amulet_requests_running", model=MODEL) == 1
    assert _value(s, "amulet_prefix_cache_queries_total", model=MODEL) == 41


def test_metric_types(metrics: PrometheusMetrics) -> None:
    types = {f.name: f.type for f in text_string_to_metric_families(metrics.render().decode())}
    for name in (
        "amulet_time_to_first_token_seconds", "amulet_inter_token_latency_seconds",
        "amulet_e2e_request_latency_seconds", "amulet_request_queue_time_seconds",
        "amulet_engine_step_duration_seconds", "amulet_request_prompt_tokens", "amulet_request_generation_tokens",
    ):  # fmt: skip
        assert types[name] == "histogram", name
    for name in (
        "amulet_prompt_tokens", "amulet_generation_tokens", "amulet_requests",
        "amulet_prefix_cache_queries", "amulet_prefix_cache_hits",
    ):  # fmt: skip
        assert types[name] == "counter", name
    for name in ("amulet_requests_running", "amulet_requests_waiting", "amulet_kv_cache_usage_ratio"):
        assert types[name] == "gauge", name


def test_broken_engine_stats_do_not_break_the_scrape() -> None:
    def broken() -> EngineStats:
        raise RuntimeError("engine gone")

    metrics = PrometheusMetrics(MODEL, broken)
    metrics.request_finished(_record("base"))
    s = _samples(metrics)
    assert _value(s, "amulet_requests_total", model=MODEL, method="base", finish_reason="stop") == 1
    assert not [x for x in s if x.name == "amulet_requests_running"]


def test_registries_are_independent() -> None:
    one = PrometheusMetrics("a", EngineStats)
    two = PrometheusMetrics("b", EngineStats, registry=CollectorRegistry())
    one.request_finished(_record("la"))
    assert _value(_samples(one), "amulet_requests_total", model="a", method="la", finish_reason="stop") == 1
    assert _value(_samples(two), "amulet_requests_total", model="b", method="la", finish_reason="stop") == 0


def test_no_created_series(metrics: PrometheusMetrics) -> None:
    assert "_created" not in metrics.render().decode()


def test_mount_metrics_serves_text_format(metrics: PrometheusMetrics) -> None:
    app = FastAPI()
    mount_metrics(app, metrics)
    metrics.request_finished(_record("amulet"))
    with TestClient(app) as client:
        response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    samples = families["amulet_requests"].samples
    assert _value(samples, "amulet_requests_total", model=MODEL, method="amulet", finish_reason="stop") == 1


def test_contexts_per_request_histogram(metrics: PrometheusMetrics) -> None:
    from dataclasses import replace

    metrics.request_finished(replace(_record("amulet"), contexts=3))
    metrics.request_finished(replace(_record("amulet"), contexts=2))
    metrics.request_finished(_record("base"))
    s = _samples(metrics)
    amulet = {"model": MODEL, "method": "amulet"}
    assert _value(s, "amulet_request_contexts_count", **amulet) == 2
    assert _value(s, "amulet_request_contexts_sum", **amulet) == 5
    assert _bucket(s, "amulet_request_contexts", "2.0", **amulet) == 1
    assert _value(s, "amulet_request_contexts_sum", model=MODEL, method="base") == 1
