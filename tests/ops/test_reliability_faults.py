"""Faults inside one request, and a client that never reads: the real engine (SmolLM2, float32) behind a real server.

* An exception raised while one request decodes (through ``LLMEngine.fault_hook``, test-only) fails
  that request with a stable error and a request id, the exception text only in the server log (an error
  event when streaming, a 500 otherwise); the requests
  decoded in the same batch finish normally and the server keeps serving.
* A client that opens a stream and never reads it does not hold up the engine or other clients:
  the engine finishes its answer while the server is still stuck writing it, and the answer is
  complete and well formed once the client reads it.

One server (and one engine over the session's float32 model) serves the whole module.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from amulet_core.engine.async_engine import AsyncEngine
from amulet_core.engine.config import EngineConfig
from amulet_core.engine.protocol import GenerationRequest
from amulet_core.model.loading import LoadedModel
from benchmarks.load import check_stream
from server.errors import GENERATION_FAILED_MESSAGE
from tests.support.live_server import EngineServer, engine_server, wait_until

pytestmark = pytest.mark.smollm

FAULT_MARK = "Zebra-fault-marker"
NORMAL_TOKENS = 12
FAULTY_TOKENS = 48


@pytest.fixture(scope="module")
def served(smollm: LoadedModel) -> Iterator[EngineServer]:
    # Small kernel send buffers (inherited by accepted connections), as on a slow network: a client
    # that does not read then blocks the server's writes after some tens of kB.
    config = EngineConfig(max_model_len=512, max_num_seqs=8, kv_cache_tokens=4096)
    with engine_server(smollm, config, send_buffer=8192) as running:
        yield running


def body(content: str, max_tokens: int, stream: bool, preference: Any = None) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }
    if stream:
        payload["stream_options"] = {"include_usage": True}
    if preference is not None:
        payload["preference"] = preference
    return payload


def sse_lines(text: str) -> list[str]:
    return [line for line in text.split("\n") if line]


def engine_idle(engine: AsyncEngine) -> bool:
    stats = engine.stats()
    return stats.running_requests == 0 and stats.waiting_requests == 0 and stats.kv_blocks_used == 0


class FaultInjector:
    """Fails requests whose prompt holds FAULT_MARK, once every request of the batch is running."""

    def __init__(self, engine: AsyncEngine, batch_size: int) -> None:
        self.engine = engine
        self.batch_size = batch_size
        self.lock = threading.Lock()
        self.marked: dict[str, bool] = {}
        self.armed = False
        self.failed: dict[str, set[str]] = {}
        """Failed request id -> ids of the requests in the running batch at that moment."""

    def __call__(self, request: GenerationRequest) -> None:  # runs on the engine's worker thread
        llm = self.engine.engine
        with self.lock:
            if request.request_id not in self.marked:
                self.marked[request.request_id] = FAULT_MARK in llm.tokenizer.decode(list(request.prompt_ids))
            if not self.marked[request.request_id]:
                return
            running = {group.request_id for group in llm.scheduler.running}
            self.armed = self.armed or len(running) >= self.batch_size
            if not self.armed:
                return  # wait until the whole batch decodes together
            self.failed[request.request_id] = running
        raise RuntimeError("injected fault")


def test_a_fault_fails_only_its_request(served: EngineServer) -> None:
    engine = served.engine
    requests = {
        "faulty_stream": body(f"{FAULT_MARK}: count from 1 to 100.", FAULTY_TOKENS, True),
        "faulty_json": body(f"{FAULT_MARK}: name every planet.", FAULTY_TOKENS, False),
        "amulet_stream": body("Give me one tip for learning a language.", NORMAL_TOKENS, True, "concise"),
        "base_json": body("Describe the sea in one sentence.", NORMAL_TOKENS, False),
        "la_stream": body("How do I keep basil alive?", NORMAL_TOKENS, True, {"text": "formal", "method": "la"}),
    }
    injector = FaultInjector(engine, batch_size=len(requests))
    engine.engine.fault_hook = injector
    try:
        with ThreadPoolExecutor(len(requests)) as pool:
            futures = {name: pool.submit(httpx.post, served.chat_url, json=b, timeout=600) for name, b in requests.items()}
            responses = {name: f.result() for name, f in futures.items()}
    finally:
        engine.engine.fault_hook = None

    assert len(injector.failed) == 2, f"the faults never fired together with the whole batch: {injector.failed}"

    # The streamed faulty request: 200, then an error event saying what failed, then [DONE].
    stream = responses["faulty_stream"]
    assert stream.status_code == 200
    lines = sse_lines(stream.text)
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2].removeprefix("data: "))["error"]
    assert set(error) == {"message", "type", "param", "code", "request_id"}
    assert (error["type"], error["code"]) == ("server_error", "generation_failed")
    assert error["request_id"] == stream.headers["x-request-id"]
    # A stable message: the exception text ("injected fault") stays in the server log.
    assert error["message"] == GENERATION_FAILED_MESSAGE
    assert "injected fault" not in stream.text and "Traceback" not in stream.text
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-2]]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks)

    # The non-streamed faulty request: a 500 with the OpenAI error object.
    failed = responses["faulty_json"]
    assert failed.status_code == 500
    error = failed.json()["error"]
    assert (error["type"], error["code"]) == ("server_error", "generation_failed")
    assert error["message"] == GENERATION_FAILED_MESSAGE and error["request_id"] == failed.headers["x-request-id"]
    assert "injected fault" not in failed.text and "Traceback" not in failed.text

    # The others, decoded in the same batch, finish normally.
    ids = {}
    for name in ("amulet_stream", "la_stream"):
        response = responses[name]
        assert response.status_code == 200, response.text
        lines = sse_lines(response.text)
        problem, finish, tokens = check_stream(lines, NORMAL_TOKENS)  # stop or length, usage consistent, [DONE]
        assert problem is None, f"{name}: {problem}"
        ids[name] = json.loads(lines[0].removeprefix("data: "))["id"]
    plain = responses["base_json"]
    assert plain.status_code == 200, plain.text
    finish, usage = plain.json()["choices"][0]["finish_reason"], plain.json()["usage"]
    assert finish == "stop" or (finish == "length" and usage["completion_tokens"] == NORMAL_TOKENS)
    ids["base_json"] = plain.json()["id"]
    for batch in injector.failed.values():
        assert set(ids.values()) <= batch

    # Nothing is left behind, and the server goes on serving.
    wait_until(lambda: engine_idle(engine), what="the engine to be idle")
    again = httpx.post(served.chat_url, json=body("Say hello.", 4, False), timeout=600)
    assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] >= 1


def _raw_stream_request(url: str, payload: dict[str, Any]) -> socket.socket:
    """Send a POST on a socket with a tiny receive buffer, and read nothing."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small TCP window
    sock.connect((host, int(port)))
    data = json.dumps(payload).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    )
    sock.sendall(head.encode() + data)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    sock.settimeout(120)
    parts = []
    while chunk := sock.recv(65536):
        parts.append(chunk)
    sock.close()
    return b"".join(parts)


def _dechunk(raw: bytes) -> tuple[bytes, bytes]:
    """(head, body) of an HTTP/1.1 response with chunked transfer encoding."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    body = b""
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        body += rest[:size]
        rest = rest[size + 2 :]
    return head, body


def test_a_client_that_never_reads_does_not_stall_the_others(served: EngineServer) -> None:
    engine, lifecycle = served.engine, served.app.state.lifecycle
    max_tokens = 160
    # Top logprobs make every event about 1.5 kB, far more than the socket buffers hold.
    stalled_body = body("Count from 1 to 500, one number per line.", max_tokens, True) | {"logprobs": True, "top_logprobs": 20}
    sock = _raw_stream_request(served.url, stalled_body)
    try:
        wait_until(lambda: engine.stats().running_requests >= 1, timeout=60, what="the unread stream to start")
        with ThreadPoolExecutor(2) as pool:
            others = [
                pool.submit(httpx.post, served.chat_url, json=body("Name a colour.", 6, stream), timeout=600)
                for stream in (True, False)
            ]
            streamed, plain = (f.result() for f in others)
        assert streamed.status_code == 200 and check_stream(sse_lines(streamed.text), 6)[0] is None
        assert plain.status_code == 200 and plain.json()["choices"][0]["finish_reason"] in ("stop", "length")

        # The engine finishes the unread answer (its outputs wait in the request's queue) while the
        # server is still stuck sending it to the client that does not read.
        wait_until(lambda: engine_idle(engine), timeout=300, what="the engine to finish the unread stream")
        assert lifecycle.in_flight >= 1, "the unread answer fit in the socket buffers: the test proved nothing"
    finally:
        raw = _read_all(sock)

    head, content = _dechunk(raw)
    assert head.startswith(b"HTTP/1.1 200")
    problem, finish, tokens = check_stream(sse_lines(content.decode("utf-8")), max_tokens)
    assert problem is None, problem
    assert finish == "stop" or tokens == max_tokens
    assert len(content) > 100_000
    wait_until(lambda: lifecycle.in_flight == 0, what="the server to finish the response")
