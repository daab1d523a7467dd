"""Client-visible errors carry a stable message and code, never the engine's exception text, plus a request id
that the server's log line of the failure names: the real engine (a tiny random model) behind a live server,
a decoding failure injected through ``LLMEngine.fault_hook`` (test-only).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator

import httpx
import pytest

from amulet_core.engine.config import EngineConfig
from amulet_core.engine.protocol import GenerationRequest
from amulet_core.model.loading import LoadedModel
from server.errors import GENERATION_FAILED_MESSAGE
from tests.support.http import assert_no_leak, assert_openai_error
from tests.support.live_server import EngineServer, engine_server

SECRET = "injected-fault /srv/secret/weights.bin"


@pytest.fixture(scope="module")
def served(tiny_model: Callable[[str], LoadedModel]) -> Iterator[EngineServer]:
    with engine_server(tiny_model("llama"), EngineConfig(max_model_len=256, max_num_seqs=4, kv_cache_tokens=2048)) as running:
        yield running


def fail_every_request(_: GenerationRequest) -> None:
    raise RuntimeError(SECRET)


def body(stream: bool) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": stream}


def failure_lines(caplog: pytest.LogCaptureFixture, request_id: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if request_id in r.getMessage()]


def test_every_answer_has_a_request_id(served: EngineServer) -> None:
    ids = set()
    for method, path in (("GET", "/health"), ("GET", "/v1/models"), ("POST", "/v1/chat/completions")):
        response = httpx.request(method, f"{served.url}{path}", json=body(False), timeout=120)
        assert response.status_code == 200, response.text
        ids.add(response.headers["x-request-id"])
    missing_model = httpx.get(f"{served.url}/v1/models/nope", timeout=30)
    assert missing_model.status_code == 404
    ids.add(missing_model.headers["x-request-id"])
    assert len(ids) == 4 and all(i.startswith("req-") for i in ids)


def test_a_decoding_failure_is_stable_and_names_the_logged_request_id(
    served: EngineServer, caplog: pytest.LogCaptureFixture
) -> None:
    served.engine.engine.fault_hook = fail_every_request
    try:
        with caplog.at_level(logging.ERROR):
            whole = httpx.post(served.chat_url, json=body(False), timeout=120)
            streamed = httpx.post(served.chat_url, json=body(True), timeout=120)
    finally:
        served.engine.engine.fault_hook = None

    error = assert_openai_error(whole, 500)  # also checks body request_id == x-request-id header
    assert (error["message"], error["code"]) == (GENERATION_FAILED_MESSAGE, "generation_failed")
    assert_no_leak(whole, SECRET, "RuntimeError")
    (line,) = failure_lines(caplog, whole.headers["x-request-id"])
    assert SECRET in line  # the details are in the server log, under the id the client got

    assert streamed.status_code == 200
    events = [line.removeprefix("data: ") for line in streamed.text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    event = json.loads(events[-2])["error"]
    assert (event["message"], event["code"]) == (GENERATION_FAILED_MESSAGE, "generation_failed")
    assert event["request_id"] == streamed.headers["x-request-id"]
    assert_no_leak(streamed, SECRET, "RuntimeError")
    (line,) = failure_lines(caplog, event["request_id"])
    assert SECRET in line

    assert httpx.post(served.chat_url, json=body(False), timeout=120).status_code == 200  # still serving
