"""Failures stay with their request, over HTTP with the real engine on a tiny random Llama (SmolLM2's tokenizer).

* A grammar that compiles but exceeds llguidance's limits while generating (2,100 alternatives sharing their
  first character: llguidance's Earley row then holds more than its 2,000 items) ends that request with a 400
  ``grammar_limit_exceeded`` naming the grammar's field (an SSE error event when streaming), never a 500
  ``generation_failed``; a request decoded beside it in the same batch is answered as usual.
* A request whose copies (``n``) or preference contexts the KV cache can never hold is refused with a 400 that
  states its need, before anything is queued; one that fits is served.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from amulet_core.engine.config import EngineConfig
from tests.support.http import USER, assert_openai_error
from tests.support.live_server import EngineServer, engine_server

TOO_MANY_ALTERNATIVES = "start: " + " | ".join(f'"q{i}"' for i in range(2100))
"""A Lark grammar that compiles, then fails at its first token: 2,100 live alternatives (llguidance allows 2,000)."""
SMALL = EngineConfig(max_model_len=256, kv_cache_tokens=512, max_num_seqs=8)
"""32 blocks of 16 tokens."""


@pytest.fixture(scope="module")
def running(tiny_model) -> Iterator[EngineServer]:
    with engine_server(tiny_model("llama"), SMALL) as server:
        yield server


def chat(running: EngineServer, **body: Any) -> httpx.Response:
    return httpx.post(running.chat_url, json={"messages": USER, **body}, timeout=120)


def sse_events(response: httpx.Response) -> list[str]:
    return [line.removeprefix("data: ") for line in response.text.split("\n") if line.startswith("data: ")]


def assert_still_serving(running: EngineServer) -> None:
    assert httpx.get(f"{running.url}/health", timeout=30).status_code == 200
    answer = chat(running, max_tokens=3, temperature=0)
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize(
    ("field", "value"),
    [("guided_grammar", TOO_MANY_ALTERNATIVES), ("structured_outputs", {"grammar": TOO_MANY_ALTERNATIVES})],
)
def test_a_grammar_past_llguidances_limits_is_a_400_for_that_request_alone(running: EngineServer, field: str, value: Any) -> None:
    ordinary = {"max_tokens": 24, "temperature": 0, "ignore_eos": True}
    with ThreadPoolExecutor(2) as pool:  # decoded in the same batches as far as the timing allows
        beside = pool.submit(chat, running, **ordinary)
        failed = chat(running, max_tokens=8, **{field: value})
        other = beside.result()
    error = assert_openai_error(failed, 400)
    assert error["code"] == "grammar_limit_exceeded" and error["param"] == field
    assert error["type"] == "invalid_request_error"
    assert "2000" in error["message"]  # llguidance's reason: the limit it ran into
    assert other.status_code == 200 and other.json()["choices"][0]["finish_reason"] == "length"
    assert other.json()["usage"]["completion_tokens"] == 24
    assert_still_serving(running)


def test_streaming_the_grammar_failure_is_an_error_event(running: EngineServer) -> None:
    response = chat(running, max_tokens=8, stream=True, guided_grammar=TOO_MANY_ALTERNATIVES)
    assert response.status_code == 200  # the stream had begun
    events = sse_events(response)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "grammar_limit_exceeded" and error["param"] == "guided_grammar"
    assert error["type"] == "invalid_request_error"
    assert_still_serving(running)


def test_one_choice_of_n_failing_its_grammar_fails_the_request_as_a_400(running: EngineServer) -> None:
    failed = chat(running, max_tokens=8, n=2, temperature=1.0, seed=1, guided_grammar=TOO_MANY_ALTERNATIVES)
    error = assert_openai_error(failed, 400)
    assert error["code"] == "grammar_limit_exceeded" and error["param"] == "guided_grammar"
    assert_still_serving(running)


def test_copies_and_contexts_that_can_never_fit_are_refused_with_their_need(running: EngineServer) -> None:
    # Three contexts (two preferences and the contrast one) of about 60 tokens and 190 new ones: more than the
    # cache's 32 blocks at their longest, whatever the number of copies.
    body = {"max_tokens": 190, "preference": {"text": ["concise", "formal"]}}
    for n in (1, 3):
        refused = chat(running, n=n, temperature=1.0, **body)
        error = assert_openai_error(refused, 400)
        assert error["code"] == "context_length_exceeded" and error["param"] == "max_tokens"
        assert "3 contexts need" in error["message"] and "the KV cache holds 32 blocks (512 tokens)" in error["message"]
    assert running.engine.stats().waiting_requests == 0 and running.engine.stats().running_requests == 0
    # Each copy fits alone: four of them are served, one after another when the cache is full.
    fits = chat(running, n=4, temperature=1.0, seed=3, max_tokens=100, ignore_eos=True, preference="concise")
    assert fits.status_code == 200, fits.text
    assert [c["finish_reason"] for c in fits.json()["choices"]] == ["length"] * 4
    assert_still_serving(running)
