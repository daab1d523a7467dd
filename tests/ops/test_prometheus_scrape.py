"""A real Prometheus scrapes a real server on loopback and can tell Amulet requests from base ones.

Prometheus comes from Debian's ``prometheus`` package (``tests/tools/ensure_debian_package.sh``
installs it when missing; the test skips only where it cannot be installed). The server is the
real app (``create_app`` + ``mount_metrics``) over the fake engine, served by uvicorn on
127.0.0.1. Every wait is a poll with a deadline; nothing asserts on timings.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.app import create_app
from server.config import ServerConfig
from server.metrics import PrometheusMetrics, mount_metrics
from tests.support import ROOT
from tests.support.fake_engine import FakeEngine
from tests.support.http import API_KEY
from tests.support.live_server import free_port, live_server

pytestmark = pytest.mark.system

DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "amulet.json"
DEADLINE_S = 60.0
JOB = "amulet-test"


def _poll(check: Callable[[], Any], what: str, deadline_s: float = DEADLINE_S) -> Any:
    """Call ``check`` until it returns something truthy; fail after ``deadline_s`` seconds."""
    deadline = time.monotonic() + deadline_s
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.25)
    raise AssertionError(f"timed out after {deadline_s:.0f}s waiting for {what} (last: {last!r})")


@pytest.fixture
def server_url() -> Iterator[str]:
    engine = FakeEngine(model_name="scrape-model")
    metrics = PrometheusMetrics(engine.model_name, engine.stats)
    app = create_app(engine, ServerConfig(api_key=API_KEY), observer=metrics)
    mount_metrics(app, metrics)
    with live_server(app) as server:
        yield server.url


class Prometheus:
    """One Prometheus process with its own config, storage and port under ``workdir``."""

    def __init__(self, binary: str, workdir: Path, target: str) -> None:
        config = workdir / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"scrape_configs:\n  - job_name: {JOB}\n    metrics_path: /metrics\n"
            f"    static_configs:\n      - targets: ['{target}']\n"
        )
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = workdir / "prometheus.log"
        self._log_file = self.log.open("wb")
        self._process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address={self.url.removeprefix('http://')}",
                "--log.level=warn",
            ],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self) -> None:
        def ready() -> bool:
            if self._process.poll() is not None:
                raise AssertionError(f"Prometheus exited with {self._process.returncode}:\n{self.log.read_text()}")
            try:
                return httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        _poll(ready, "Prometheus to become ready")

    def query(self, promql: str) -> dict[str, Any]:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=10)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", f"{promql}: {body}"
        return body["data"]

    def stop(self) -> None:
        self._process.terminate()
        try:
            self._process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=10)
        self._log_file.close()


@pytest.fixture
def prometheus(prometheus_binary: str, server_url: str, tmp_path: Path) -> Iterator[Prometheus]:
    instance = Prometheus(prometheus_binary, tmp_path, server_url.removeprefix("http://"))
    try:
        instance.wait_ready()
        yield instance
    finally:
        instance.stop()


def _chat(server_url: str, preference: dict[str, Any] | None, stream: bool = False) -> None:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8, "stream": stream}
    if preference is not None:
        body["preference"] = preference
    headers = {"Authorization": f"Bearer {API_KEY}"}
    response = httpx.post(f"{server_url}/v1/chat/completions", json=body, headers=headers, timeout=30)
    assert response.status_code == 200, response.text


def _value(data: dict[str, Any]) -> float:
    """The single value of an instant-vector query answer (0 when it has no series yet)."""
    results = data["result"]
    assert len(results) <= 1, f"expected at most one series, got {results}"
    return float(results[0]["value"][1]) if results else 0.0


def test_prometheus_sees_amulet_and_base_requests(server_url: str, prometheus: Prometheus) -> None:
    # Prometheus scrapes the server through its open /metrics (the API itself needs the key).
    _poll(lambda: _value(prometheus.query(f'up{{job="{JOB}"}}')) == 1, "the first successful scrape")
    ttft_count = 'amulet_time_to_first_token_seconds_count{{method="{}"}}'
    # Series exist from the first scrape, at zero, before any request.
    assert _value(prometheus.query(ttft_count.format("amulet"))) == 0
    assert _value(prometheus.query(ttft_count.format("base"))) == 0

    for stream in (False, True):
        _chat(server_url, {"text": "concise", "method": "amulet"}, stream=stream)
        _chat(server_url, None, stream=stream)
    _chat(server_url, {"text": "concise", "method": "amulet"})

    _poll(lambda: _value(prometheus.query(ttft_count.format("amulet"))) >= 3, "the amulet requests' TTFT")
    _poll(lambda: _value(prometheus.query(ttft_count.format("base"))) >= 2, "the base requests' TTFT")
    assert _value(prometheus.query(ttft_count.format("amulet"))) == 3
    assert _value(prometheus.query(ttft_count.format("base"))) == 2
    assert _value(prometheus.query(ttft_count.format("pref"))) == 0

    finished = prometheus.query('sum by (method) (amulet_requests_total{finish_reason="length"})')
    by_method = {r["metric"]["method"]: float(r["value"][1]) for r in finished["result"]}
    assert by_method["amulet"] == 3 and by_method["base"] == 2
    generated = prometheus.query('sum(amulet_generation_tokens_total{model="scrape-model"})')
    assert _value(generated) == 5 * 8


def test_every_dashboard_query_runs_on_prometheus(server_url: str, prometheus: Prometheus) -> None:
    _chat(server_url, {"text": "concise", "method": "amulet"})
    _chat(server_url, None)
    _poll(lambda: _value(prometheus.query("sum(amulet_e2e_request_latency_seconds_count)")) >= 2, "a scrape")
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert exprs
    for expr in exprs:
        promql = expr.replace("$__rate_interval", "1m").replace("$model", ".*")
        assert not re.search(r"\$\w+", promql), f"unsubstituted dashboard variable in {expr}"
        prometheus.query(promql)  # asserts the query parses and evaluates
