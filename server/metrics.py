"""Prometheus metrics for the server: per-request histograms/counters and engine gauges.

Everything lives in one :class:`~prometheus_client.CollectorRegistry` owned by a
:class:`PrometheusMetrics` instance (nothing is registered in the process-global default
registry), so several servers or tests can run side by side in one process.

Per-request metrics carry the labels ``model`` and ``method`` (base, pref, la, amulet) so the
cost of Amulet decoding can be compared with plain decoding; engine-wide metrics carry
``model`` only. Meanings follow vLLM's metrics of the same names (``vllm:`` -> ``amulet_``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from amulet_core.engine.protocol import EngineStats
from amulet_core.method.settings import Method
from server.observer import RequestRecord

logger = logging.getLogger(__name__)

METHODS: tuple[str, ...] = tuple(m.value for m in Method)
FINISH_REASONS: tuple[str, ...] = ("stop", "length", "abort", "error")
OTHER = "other"
"""Label value for a method or finish reason outside the known sets (keeps label cardinality bounded)."""

# Buckets span GPU speeds (a few ms per token) and CPU speeds (tens to hundreds of ms per
# token, seconds per prefill), with Amulet's extra per-token work on top of either.
TTFT_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 0.75,
    1.0, 1.5, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
INTER_TOKEN_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1,
    0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
)  # fmt: skip
E2E_BUCKETS = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 45.0,
    60.0, 120.0, 240.0, 480.0, 960.0,
)  # fmt: skip
QUEUE_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0, 20.0, 40.0, 80.0, 160.0,
)  # fmt: skip
STEP_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1,
    0.15, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip
TOKEN_BUCKETS = (
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0,
    10000.0, 20000.0, 50000.0, 100000.0,
)  # fmt: skip
BATCH_BUCKETS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0)
CONTEXT_BUCKETS = (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0)
"""Contexts per request: base 1, one preference 2, K preferences K + 1 (at most --max-preferences + 1)."""


def _label(value: object, known: tuple[str, ...]) -> str:
    text = str(getattr(value, "value", value))
    return text if text in known else OTHER


def _seconds(value: float | None) -> float | None:
    """A duration fit to observe, or None for a missing, negative or non-finite one."""
    if value is None or not math.isfinite(value) or value < 0:
        return None
    return float(value)


_EngineReading = tuple[str, str, Callable[[EngineStats], float]]
_ENGINE_GAUGES: tuple[_EngineReading, ...] = (
    ("amulet_requests_running", "Requests in the running batch.", lambda s: s.running_requests),
    ("amulet_requests_waiting", "Requests queued, waiting to be scheduled.", lambda s: s.waiting_requests),
    ("amulet_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use (0 to 1).", lambda s: s.kv_cache_usage),
)
_ENGINE_COUNTERS: tuple[_EngineReading, ...] = (
    ("amulet_prefix_cache_queries", "Prefix-cache queries counted by the engine.", lambda s: s.prefix_cache_queries),
    ("amulet_prefix_cache_hits", "Prefix-cache hits counted by the engine.", lambda s: s.prefix_cache_hits),
)
"""Engine-wide metrics read from :class:`EngineStats` at scrape time (counter names get ``_total``)."""


class EngineStatsCollector(Collector):
    """Reads the engine's snapshot at scrape time and exposes it as gauges and counters."""

    def __init__(self, model_name: str, engine_stats: Callable[[], EngineStats]) -> None:
        self._model = model_name
        self._engine_stats = engine_stats

    def _families(self, stats: EngineStats | None) -> list[Metric]:
        """The engine families; with ``stats`` None they carry no samples (for ``describe``)."""
        out: list[Metric] = []
        for kind, specs in ((GaugeMetricFamily, _ENGINE_GAUGES), (CounterMetricFamily, _ENGINE_COUNTERS)):
            for name, doc, read in specs:
                family = kind(name, doc, labels=["model"])
                if stats is not None:
                    family.add_metric([self._model], float(read(stats)))
                out.append(family)
        return out

    def describe(self) -> Iterable[Metric]:
        return self._families(None)

    def collect(self) -> Iterable[Metric]:
        try:
            stats = self._engine_stats()
        except Exception:  # a broken stats call must not break the whole scrape
            logger.exception("Reading engine stats for /metrics failed")
            stats = None
        return self._families(stats)


class PrometheusMetrics:
    """A :class:`server.observer.RequestObserver` that records requests and engine steps for Prometheus."""

    def __init__(
        self,
        model_name: str,
        engine_stats: Callable[[], EngineStats],
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.model_name = model_name
        self.registry = registry if registry is not None else CollectorRegistry()
        per_request = ["model", "method"]
        reg = self.registry

        self._ttft = Histogram(
            "amulet_time_to_first_token_seconds", "Time from request arrival to its first generated token.",
            per_request, buckets=TTFT_BUCKETS, registry=reg,
        )  # fmt: skip
        self._inter_token = Histogram(
            "amulet_inter_token_latency_seconds", "Time between consecutive generated tokens of a request.",
            per_request, buckets=INTER_TOKEN_BUCKETS, registry=reg,
        )  # fmt: skip
        self._e2e = Histogram(
            "amulet_e2e_request_latency_seconds", "Time from request arrival to its last token (or abort/error).",
            per_request, buckets=E2E_BUCKETS, registry=reg,
        )  # fmt: skip
        self._queue = Histogram(
            "amulet_request_queue_time_seconds", "Time a request waited in the engine queue before its first step.",
            per_request, buckets=QUEUE_BUCKETS, registry=reg,
        )  # fmt: skip
        self._prompt_hist = Histogram(
            "amulet_request_prompt_tokens", "Prompt tokens per request.",
            per_request, buckets=TOKEN_BUCKETS, registry=reg,
        )  # fmt: skip
        self._generation_hist = Histogram(
            "amulet_request_generation_tokens", "Generated tokens per request.",
            per_request, buckets=TOKEN_BUCKETS, registry=reg,
        )  # fmt: skip
        self._contexts = Histogram(
            "amulet_request_contexts", "Contexts decoded together per request (preferences plus the contrast).",
            per_request, buckets=CONTEXT_BUCKETS, registry=reg,
        )  # fmt: skip
        self._prompt_total = Counter("amulet_prompt_tokens", "Prompt tokens processed.", per_request, registry=reg)
        self._generation_total = Counter("amulet_generation_tokens", "Tokens generated.", per_request, registry=reg)
        self._requests = Counter(
            "amulet_requests", "Finished requests, by finish reason (stop, length, abort, error).",
            ["model", "method", "finish_reason"], registry=reg,
        )  # fmt: skip
        self._step = Histogram(
            "amulet_engine_step_duration_seconds", "Duration of one engine step (one forward pass of the batch).",
            ["model"], buckets=STEP_BUCKETS, registry=reg,
        )  # fmt: skip
        self._step_seqs = Histogram(
            "amulet_engine_step_sequences", "Sequences decoded together in one engine step.",
            ["model"], buckets=BATCH_BUCKETS, registry=reg,
        )  # fmt: skip
        self._stalls = Counter(
            "amulet_engine_stalls", "Times the engine stopped making progress (stalled step or dead worker thread).",
            ["model"], registry=reg,
        )  # fmt: skip
        self._stalls.labels(model_name)
        reg.register(EngineStatsCollector(model_name, engine_stats))
        self._initialise_series()

    def _initialise_series(self) -> None:
        """Create every known label combination at zero, so series exist before the first request."""
        per_method = (
            self._ttft, self._inter_token, self._e2e, self._queue,
            self._prompt_hist, self._generation_hist, self._prompt_total, self._generation_total, self._contexts,
        )  # fmt: skip
        for method in METHODS:
            for metric in per_method:
                metric.labels(self.model_name, method)
            for reason in FINISH_REASONS:
                self._requests.labels(self.model_name, method, reason)
        self._step.labels(self.model_name)
        self._step_seqs.labels(self.model_name)

    def request_finished(self, record: RequestRecord) -> None:
        """Record one finished request. Never raises: metrics must not break the request path."""
        try:
            self._record(record)
        except Exception:
            logger.exception("Recording request metrics failed")

    def _record(self, record: RequestRecord) -> None:
        method = _label(record.method, METHODS)
        labels = (self.model_name, method)
        reason = _label(record.finish_reason, FINISH_REASONS)
        self._requests.labels(self.model_name, method, reason).inc()

        prompt = max(0, int(record.prompt_tokens))
        completion = max(0, int(record.completion_tokens))
        self._prompt_total.labels(*labels).inc(prompt)
        self._generation_total.labels(*labels).inc(completion)
        self._prompt_hist.labels(*labels).observe(prompt)
        self._generation_hist.labels(*labels).observe(completion)
        self._contexts.labels(*labels).observe(max(1, int(record.contexts)))

        for hist, value in ((self._e2e, record.e2e_s), (self._ttft, record.ttft_s), (self._queue, record.queue_s)):
            seconds = _seconds(value)
            if seconds is not None:
                hist.labels(*labels).observe(seconds)
        self._observe_all(self._inter_token.labels(*labels), record.inter_token_s)

    @staticmethod
    def _observe_all(child: Histogram, values: Iterable[float]) -> None:
        for value in values:
            seconds = _seconds(value)
            if seconds is not None:
                child.observe(seconds)

    def engine_stalled(self) -> None:
        """Count one engine failure seen by the watchdog (``amulet_engine_stalls_total``)."""
        self._stalls.labels(self.model_name).inc()

    def step_observed(self, duration_s: float, num_seqs: int) -> None:
        """Record one engine step; called from the engine's worker thread (prometheus-client is thread-safe)."""
        try:
            seconds = _seconds(duration_s)
            if seconds is not None:
                self._step.labels(self.model_name).observe(seconds)
            if num_seqs > 0:
                self._step_seqs.labels(self.model_name).observe(num_seqs)
        except Exception:
            logger.exception("Recording engine step metrics failed")

    def render(self) -> bytes:
        """The registry in Prometheus text exposition format, without the ``*_created`` series."""
        return generate_latest(_WithoutCreated(self.registry))


class _WithoutCreated:
    """A read-only view of a registry that drops prometheus-client's ``*_created`` timestamp samples.

    Prometheus ignores them in the text format; they would only double the size of every scrape.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family


def mount_metrics(app: FastAPI, metrics: PrometheusMetrics) -> None:
    """Add ``GET /metrics`` serving ``metrics`` in Prometheus text format."""

    async def prometheus_metrics() -> Response:
        return Response(content=metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.add_api_route("/metrics", prometheus_metrics, methods=["GET"], include_in_schema=False)
