"""The engine watchdog of a real ``amulet-server`` process over a tiny random model saved to disk.

The hidden, test-only ``--test-engine-fault`` makes the worker thread block for ever (``stall``) or die
(``die``) a few tokens into the first request. Either way ``/health`` turns 503 with the reason, the
running stream ends with an ``engine_stalled`` error event, new requests get 503, ``/metrics`` counts the
stall, and the process exits with status 5; restarted without the fault (as a supervisor would), it serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
from pathlib import Path

import httpx
import pytest

from amulet_core.engine import watchdog
from benchmarks.load import ServerProcess
from server.app import create_app
from server.config import ServerConfig
from server.errors import ENGINE_STALLED_MESSAGE
from server.lifecycle import ServerLifecycle
from server.supervision import EXIT_ENGINE_FAILED, TEST_FAULTS, supervise
from tests.support.fake_engine import FakeEngine
from tests.support.live_server import wait_until

DEADLINE_S = 300.0
"""Generous: starting a process imports torch and transformers, far slower on a busy machine."""
DRAIN_S = 30
"""A broken process stays up (503 everywhere) this long before it exits: the checks in :func:`check_reported` take a
fraction of a second after the fault on a quiet machine; the margin is for a loaded one."""
CHAT = {"messages": [{"role": "user", "content": "Count to fifty."}], "max_tokens": 40, "temperature": 0}


@pytest.fixture(scope="module")
def model_folder(tiny_model_folder: str) -> str:
    return tiny_model_folder


def start(folder: str, log: Path, *extra: str) -> ServerProcess:
    """An ``amulet-server`` process over ``folder`` (not waited for: see :meth:`ServerProcess.wait_ready`)."""
    args = ["--model", folder, "--dtype", "float32", "--max-model-len", "256", "--drain-timeout", str(DRAIN_S), *extra]
    return ServerProcess(args, log, {"OMP_NUM_THREADS": "1"})


def check_reported(fault: str, server: ServerProcess) -> None:
    """The fault fires a few tokens into a stream: the stream ends with the error event, ``/health`` and new requests
    answer 503 with the reason, ``/metrics`` counts the stall (all within the drain, even on a loaded machine)."""
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200, fault
    streamed = httpx.post(f"{server.url}/v1/chat/completions", json=CHAT | {"stream": True}, timeout=DEADLINE_S)
    assert streamed.status_code == 200, fault  # the fault fires a few tokens in: the stream had begun
    events = [line.removeprefix("data: ") for line in streamed.text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]", (fault, events)
    error = json.loads(events[-2])["error"]
    assert (error["code"], error["message"]) == ("engine_stalled", ENGINE_STALLED_MESSAGE), (fault, error)
    assert error["request_id"] == streamed.headers["x-request-id"], fault

    health = httpx.get(f"{server.url}/health", timeout=10)
    assert health.status_code == 503 and health.json()["error"]["code"] == "engine_stalled", (fault, health.text)
    expected = "died" if fault == "die" else "no engine step completed"
    assert expected in health.json()["error"]["message"], (fault, health.text)
    refused = httpx.post(f"{server.url}/v1/chat/completions", json=CHAT, timeout=30)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_stalled", (fault, refused.text)
    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    stalls = [line for line in metrics.splitlines() if line.startswith("amulet_engine_stalls_total{")]
    assert any(line.endswith(" 1.0") for line in stalls), (fault, stalls)


def exited(server: ServerProcess) -> bool:
    return server.process.poll() is not None


@pytest.mark.slow  # three server starts and a 30 s drain
def test_a_broken_engine_is_reported_and_exits_for_a_restart(model_folder: str, tmp_path: Path) -> None:
    """Both faults, ``stall`` and ``die``, each in a process of its own, side by side: their drains overlap
    (one after the other they doubled the test's time); then a process started without the fault serves. That one
    (what a supervisor starts) is started as soon as both faults are reported, while the broken ones drain idle."""
    with contextlib.ExitStack() as stopped_at_the_end:
        broken = {}
        for fault in TEST_FAULTS:
            fault_args = ("--test-engine-fault", fault, "--engine-stall-timeout", "5")
            broken[fault] = start(model_folder, tmp_path / f"{fault}.log", *fault_args)
            stopped_at_the_end.callback(broken[fault].stop)
        for server in broken.values():
            server.wait_ready(DEADLINE_S)
        for fault, server in broken.items():
            check_reported(fault, server)

        restarted = start(model_folder, tmp_path / "restarted.log")
        stopped_at_the_end.callback(restarted.stop)
        for fault, server in broken.items():
            wait_until(functools.partial(exited, server), DEADLINE_S, f"the {fault} server to exit")
            assert server.process.returncode == EXIT_ENGINE_FAILED, server.log()[-4000:]
            assert "Engine failure, draining then exiting with status 5" in server.log(), fault

        restarted.wait_ready(DEADLINE_S)
        answer = httpx.post(f"{restarted.url}/v1/chat/completions", json=CHAT, timeout=DEADLINE_S)
        assert answer.status_code == 200 and answer.json()["choices"][0]["finish_reason"] in ("stop", "length")
        assert httpx.get(f"{restarted.url}/health", timeout=10).status_code == 200
        assert restarted.stop() == 0, restarted.log()[-4000:]  # SIGTERM: drained, exit 0


def test_the_automatic_stall_timeout_follows_the_step_time(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(watchdog.time, "monotonic", lambda: now[0])
    watch = watchdog.StepWatch()
    assert watch.timeout_s == watchdog.MIN_STALL_TIMEOUT_S and watch.stalled_for() is None  # idle: never stalled
    for _ in range(100):  # steps of 10 s: the timeout becomes 20 x 10 s
        watch.started()
        now[0] += 10.0
        watch.finished()
    assert watch.timeout_s == pytest.approx(watchdog.STALL_STEP_FACTOR * 10.0, rel=1e-3)
    watch.started()
    now[0] += 150.0
    assert watch.stalled_for() is None
    now[0] += 100.0
    assert watch.stalled_for() == pytest.approx(250.0)
    fixed = watchdog.StepWatch(2.0)
    fixed.started()
    now[0] += 3.0
    assert fixed.timeout_s == 2.0 and fixed.stalled_for() == pytest.approx(3.0)
    with pytest.raises(ValueError):
        watchdog.StepWatch(0.0)


class _FailedEngine:
    """What ``supervise`` reads of an AsyncEngine whose worker has just died."""

    load_finished = True
    load_error = None

    def __init__(self) -> None:
        self.failed_with: str | None = None

    def failure(self) -> str:
        return "the engine's worker thread died"

    def fail(self, reason: str) -> None:
        self.failed_with = reason


def test_from_the_failure_on_every_api_call_is_refused_as_stalled() -> None:
    """No request may slip in between the failure and the drain and be told the model is still loading."""
    app = create_app(FakeEngine(), ServerConfig())
    lifecycle: ServerLifecycle = app.state.lifecycle
    engine = _FailedEngine()
    stalls: list[int] = []
    asyncio.run(supervise(engine, lifecycle, True, lambda: stalls.append(1)))  # type: ignore[arg-type]
    assert engine.failed_with == "the engine's worker thread died" and stalls == [1]
    assert lifecycle.exit_status == EXIT_ENGINE_FAILED and lifecycle.draining

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            return await client.post("/v1/chat/completions", json=CHAT)

    refused = asyncio.run(call())
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_stalled"
