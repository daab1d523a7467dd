"""`docker compose up`, for real, with podman: the images are built and the compose stack runs.

podman, runc, podman-compose and debootstrap are installed when missing (Debian's packages); podman runs with
docker/podman/containers.conf (runc: crun fails on these hosts' hybrid cgroups). docker/build-images.sh makes
the local Debian base (debootstrap), Prometheus from Debian's package and the CPU server image from the project's
Dockerfile (the CPU torch wheel from /opt/wheels as a simple index, the host's CA bundle for the TLS-re-signing
proxy). Then ``podman-compose -f docker-compose.yml -f docker-compose.podman.yml up -d server prometheus`` starts
the server and Prometheus on their published ports (127.0.0.1:8000 and :9090), and the tests check what a user
would: the server answers through the published port with the key, Prometheus scrapes it, the server is not root
and keeps its model cache on its volume, a killed server comes back, and ``down`` leaves nothing running.
Grafana (no image without a registry) is replaced by a check of the dashboard's metrics against the running
server and its Prometheus.

Cost (docker/README.md, "What was tested"): about 4 minutes on a fresh machine (installs and image builds), about
1 minute when the images are cached in podman's storage. The tests run in file order: the last one takes the stack down.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest

from tests.ops.podman_stack import BUILD_IMAGES, Stack, ensure_tools, http_get, http_post_json, poll
from tests.support import ROOT

pytestmark = [pytest.mark.system, pytest.mark.slow]

SERVER = "http://127.0.0.1:8000"
PROMETHEUS = "http://127.0.0.1:9090"
PROJECT = "amulet-compose-test"
API_KEY = "sk-compose-up-test"
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "amulet.json"
METRIC = re.compile(r"\bamulet_[A-Za-z0-9_]+")
READY_DEADLINE_S = 300.0
"""Model load in the container (about 25 s here on a quiet machine; the embedded model is converted on first start)."""


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    ensure_tools()
    stack = Stack(PROJECT, API_KEY)
    build = stack.run("bash", str(BUILD_IMAGES), "base", "prometheus", "server", timeout=3600, check=False)
    assert build.returncode == 0, f"the images did not build:\n{build.stderr[-6000:]}"
    stack.compose("down", "-v")  # leftovers of an interrupted run
    busy = [port for port in (8000, 9090) if not _port_free(port)]
    assert not busy, f"127.0.0.1 ports {busy} are taken: the compose stack publishes them"
    try:
        stack.compose("up", "-d", "--no-build", "server", "prometheus")
        poll(lambda: http_get(f"{SERVER}/ready")[0] == 200, "the server's /ready through the published port", READY_DEADLINE_S)
        yield stack
    finally:
        for server in stack.containers("server"):  # shown when a test failed
            logs = stack.podman("logs", "--tail", "50", server, check=False)
            print(logs.stdout, logs.stderr)
        stack.compose("down", "-v")


def _stream_chat(stack: Stack, preference: dict[str, Any] | None) -> tuple[list[dict[str, Any]], bool]:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "Explain photosynthesis."}], "max_tokens": 16}
    body["stream"] = True
    if preference is not None:
        body["preference"] = preference
    chunks: list[dict[str, Any]] = []
    done = False
    with http_post_json(f"{SERVER}/v1/chat/completions", body, stack.api_key) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        for raw in response:
            line = raw.decode().strip()
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunks.append(json.loads(line[len("data: ") :]))
    return chunks, done


def _prometheus(query: str) -> list[dict[str, Any]]:
    status, body = http_get(f"{PROMETHEUS}/api/v1/query?query={quote(query, safe='')}")
    assert status == 200, body
    return json.loads(body)["data"]["result"]


def test_the_server_streams_a_chat_completion_with_a_preference(stack: Stack) -> None:
    status, body = http_get(f"{SERVER}/ready")
    assert status == 200 and json.loads(body)["status"] == "ready"
    chunks, done = _stream_chat(stack, {"text": "concise", "method": "amulet"})
    assert done
    assert chunks[0]["preference"]["method"] == "amulet"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text.strip()
    assert {c["choices"][0]["finish_reason"] for c in chunks if c["choices"]} & {"stop", "length"}


def test_the_api_refuses_a_caller_without_the_key(stack: Stack) -> None:
    assert http_get(f"{SERVER}/v1/models")[0] == 401
    assert http_get(f"{SERVER}/v1/models", {"Authorization": "Bearer wrong-key"})[0] == 401
    assert http_get(f"{SERVER}/v1/models", {"Authorization": f"Bearer {stack.api_key}"})[0] == 200


def test_prometheus_scrapes_the_server_and_has_time_to_first_token_samples(stack: Stack) -> None:
    _stream_chat(stack, {"text": "concise", "method": "amulet"})

    def server_target_up() -> bool:
        status, body = http_get(f"{PROMETHEUS}/api/v1/targets")
        targets = json.loads(body)["data"]["activeTargets"] if status == 200 else []
        return any(t["scrapeUrl"] == "http://server:8000/metrics" and t["health"] == "up" for t in targets)

    poll(server_target_up, "Prometheus's target server:8000 up", 90)

    def ttft_samples() -> list[dict[str, Any]]:
        result = _prometheus('amulet_time_to_first_token_seconds_count{method="amulet"}')
        return [r for r in result if float(r["value"][1]) >= 1]

    poll(ttft_samples, "a scraped time-to-first-token histogram with the amulet request", 90)
    buckets = _prometheus('amulet_time_to_first_token_seconds_bucket{method="amulet",le="+Inf"}')
    assert buckets and float(buckets[0]["value"][1]) >= 1


def test_every_dashboard_query_names_a_metric_the_running_server_exports(stack: Stack) -> None:
    """Grafana's stand-in: the dashboard's metrics are in the container's /metrics, and each query runs on the
    stack's Prometheus."""
    status, body = http_get(f"{SERVER}/metrics")
    assert status == 200
    exported = set(re.findall(r"^(amulet_[A-Za-z0-9_]+)", body.decode(), flags=re.MULTILINE))
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [*dashboard["panels"], *(p for row in dashboard["panels"] for p in row.get("panels", []))]
    exprs = [t["expr"] for p in panels for t in p.get("targets", []) if "expr" in t]
    assert exprs
    for expr in exprs:
        names = set(METRIC.findall(expr))
        assert names, f"a dashboard query names no amulet_ metric: {expr}"
        assert names <= exported, f"{expr}: {sorted(names - exported)} not exported by the server"
        promql = expr.replace("$__rate_interval", "1m").replace("$model", ".*")
        status, answer = http_get(f"{PROMETHEUS}/api/v1/query?query={quote(promql, safe='')}")
        assert status == 200 and json.loads(answer)["status"] == "success", f"{expr}: {answer[:300]!r}"


def test_the_server_runs_as_non_root_with_the_model_cache_on_its_volume(stack: Stack) -> None:
    server = stack.the_container("server")
    uid = stack.podman("exec", server, "id", "-u").stdout.strip()
    assert uid != "0" and uid == "10001"
    state = stack.inspect(server)
    (mount,) = [m for m in state["Mounts"] if m["Destination"] == "/data/hf"]
    assert mount["Type"] == "volume" and mount["Name"] == f"{PROJECT}_hf-cache"
    cached = stack.podman("exec", server, "sh", "-c", "ls /data/hf/amulet-models").stdout.split()
    assert cached, "the converted model is not in the hf-cache volume"
    owner = stack.podman("exec", server, "stat", "-c", "%u", "/data/hf/amulet-models").stdout.strip()
    assert owner == uid


def test_the_server_compiled_its_cpu_kernels_and_keeps_them_on_its_volume(stack: Stack) -> None:
    """The image has a C compiler: the server built the batch-invariant attention's kernel at start (its log says so,
    rather than falling back to torch operations) into the volume's kernel folder."""
    server = stack.the_container("server")
    logs = stack.podman("logs", server, check=False)
    text = logs.stdout + logs.stderr
    assert "fixed-order attention kernel: compiled by" in text, text[-3000:]
    assert "no C compiler" not in text
    kept = stack.podman("exec", server, "sh", "-c", "ls /data/hf/amulet-kernels").stdout.split()
    assert any(name.startswith("fixed_order_attention-") and name.endswith(".so") for name in kept), kept


def test_a_killed_server_is_restarted_by_the_restart_policy_and_answers(stack: Stack) -> None:
    """The server process dies (SIGKILL from outside: a crash or the OOM killer); restart: unless-stopped brings
    it back. (``podman kill`` itself counts as a user's stop, which unless-stopped respects, in podman as in Docker.)"""
    server = stack.the_container("server")
    before = stack.inspect(server)
    pid = before["State"]["Pid"]
    assert pid > 0
    os.kill(pid, signal.SIGKILL)

    def restarted() -> bool:
        state = stack.inspect(server)
        return state["RestartCount"] > before["RestartCount"] and state["State"]["Running"] and state["State"]["Pid"] != pid

    poll(restarted, "the killed server restarted", 120)
    poll(lambda: http_get(f"{SERVER}/ready")[0] == 200, "/ready after the restart", READY_DEADLINE_S)
    chunks, done = _stream_chat(stack, {"text": "concise", "method": "amulet"})
    assert done and chunks


def test_compose_down_leaves_nothing_running(stack: Stack) -> None:
    assert len(stack.containers(running_only=True)) == 2
    stack.compose("down")
    assert stack.containers() == []
    assert _port_free(8000) and _port_free(9090)
    leftover = subprocess.run(["pgrep", "-f", "amulet-server --host 0.0.0.0 --port 8000 --allowed-hosts server"])
    assert leftover.returncode == 1, "an amulet-server process of the stack is still running"
