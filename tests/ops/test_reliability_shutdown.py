"""Graceful shutdown of a real ``amulet-server`` subprocess (embedded SmolLM2) on SIGTERM.

uvicorn alone closes its listening socket as soon as SIGTERM comes, so a request sent during
shutdown would be refused at the TCP level. The CLI drains instead: new API calls get a 503 with
``Retry-After``, ``/ready`` turns 503, the running requests finish (up to ``--drain-timeout``;
after that they end with an error event), then the process exits 0.

Two servers start together (one model load each, in parallel): one drains to completion, the
other has a one-second drain timeout.
"""

from __future__ import annotations

import itertools
import json
import signal
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from benchmarks.load import ServerProcess, check_stream
from tests.support.live_server import wait_until

pytestmark = pytest.mark.smollm

SERVER_ARGS = ["--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "4", "--log-level", "info"]
ENV = {"OMP_NUM_THREADS": "1"}  # the test's own clients share the 2 cores (see test_reliability_faults)
STORY = [{"role": "user", "content": "Write a very long story about a dragon and a knight, with many chapters."}]
"""Greedy, SmolLM2 writes on until max_tokens (no early end of sequence)."""


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServerProcess]]:
    logs = tmp_path_factory.mktemp("shutdown")
    started = {
        "patient": ServerProcess([*SERVER_ARGS, "--drain-timeout", "300"], logs / "patient.log", ENV),
        "hasty": ServerProcess([*SERVER_ARGS, "--drain-timeout", "1"], logs / "hasty.log", ENV),
    }
    try:
        for server in started.values():
            server.wait_ready()
        yield started
    finally:
        for server in started.values():
            if server.process.poll() is None:
                server.process.kill()
            server.stop()


def start_stream(client: httpx.Client, server: ServerProcess, max_tokens: int) -> tuple[httpx.Response, Iterator[str]]:
    """A long greedy stream, read up to its first content event (so it is running in the engine)."""
    body = {
        "messages": STORY,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    request = client.build_request("POST", f"{server.url}/v1/chat/completions", json=body)
    response = client.send(request, stream=True)
    assert response.status_code == 200
    lines = (line for line in response.iter_lines() if line)
    first = [next(lines), next(lines)]  # the role chunk, then the first token
    return response, itertools.chain(first, lines)


def sigterm_and_wait_draining(server: ServerProcess) -> None:
    server.process.send_signal(signal.SIGTERM)
    wait_until(lambda: httpx.get(f"{server.url}/ready").status_code == 503, timeout=30, what="/ready to turn 503")


def assert_refused_with_503(server: ServerProcess) -> None:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 503, response.text
    assert int(response.headers["retry-after"]) >= 1
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code", "request_id"}  # a server error names its request id
    assert error["request_id"] == response.headers["x-request-id"]
    assert (error["type"], error["code"]) == ("server_error", "server_shutting_down")
    assert httpx.get(f"{server.url}/health").status_code == 200  # alive, just not taking work


def test_sigterm_drains_running_requests_and_refuses_new_ones(servers: dict[str, ServerProcess]) -> None:
    server = servers["patient"]
    max_tokens = 96  # seconds of decoding: still running when the signal comes
    with httpx.Client(timeout=300) as client:
        response, lines = start_stream(client, server, max_tokens)
        try:
            sigterm_and_wait_draining(server)
            assert_refused_with_503(server)
            assert server.process.poll() is None  # still serving the running stream
            rest = list(lines)
        finally:
            response.close()
    problem, finish, tokens = check_stream(rest, max_tokens)
    assert problem is None, problem  # finished normally: finish_reason, usage, [DONE]; no error event
    assert finish == "stop" or tokens == max_tokens
    assert server.process.wait(60) == 0, server.log()[-3000:]
    assert "Drained: no request is running" in server.log()


def test_drain_timeout_aborts_what_still_runs(servers: dict[str, ServerProcess]) -> None:
    server = servers["hasty"]
    with httpx.Client(timeout=300) as client:
        response, lines = start_stream(client, server, max_tokens=440)
        try:
            sigterm_and_wait_draining(server)
            rest = list(lines)
        finally:
            response.close()
    assert rest[-1] == "data: [DONE]"
    error = json.loads(rest[-2].removeprefix("data: "))["error"]
    assert error["code"] == "engine_not_ready" and "shutting down" in error["message"]
    assert server.process.wait(60) == 0, server.log()[-3000:]
    assert "Drain timeout: aborting 1 request(s)" in server.log()
