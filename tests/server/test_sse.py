"""Raw SSE framing, errors inside a stream, and aborts when the client goes away (httpx, real server)."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest

from server.errors import GENERATION_FAILED_MESSAGE, INTERNAL_ERROR_MESSAGE
from tests.support.fake_engine import REPLY_PIECES, REPLY_TEXT, FakeEngine, RecordingObserver
from tests.support.http import USER
from tests.support.live_server import LiveServer, wait_until


def stream_raw(server: LiveServer, body: dict[str, Any]) -> tuple[httpx.Response, bytes]:
    response = httpx.post(f"{server.url}/v1/chat/completions", json={"stream": True, **body}, timeout=30)
    return response, response.content


def events(raw: bytes) -> list[str]:
    """SSE events of a body, checking the framing: each event is exactly one ``data: ...`` line."""
    text = raw.decode("utf-8")  # strict: a split multi-byte character fails here
    assert text.endswith("\n\n")
    blocks = text[:-2].split("\n\n")
    for block in blocks:
        assert "\n" not in block and block.startswith("data: "), block
    return [block[len("data: ") :] for block in blocks]


def test_sse_framing_as_openai(server: LiveServer, fake: FakeEngine) -> None:
    response, raw = stream_raw(server, {"messages": USER, "stream_options": {"include_usage": True}})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    data = events(raw)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1 and re.fullmatch(r"chatcmpl-[0-9a-f]{32}", ids.pop())
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "fake-model" for c in chunks)
    assert all(isinstance(c["created"], int) for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    choice_chunks = [c for c in chunks if c["choices"]]
    finishes = [c["choices"][0]["finish_reason"] for c in choice_chunks]
    assert finishes[:-1] == [None] * (len(finishes) - 1) and finishes[-1] == "stop"
    deltas = [c["choices"][0]["delta"].get("content") or "" for c in choice_chunks]
    assert deltas[1:-1] == list(REPLY_PIECES)  # one delta per token, multi-byte characters whole
    assert "".join(deltas) == REPLY_TEXT
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == len(REPLY_PIECES)
    assert usage_chunk["usage"]["prompt_tokens"] == len(fake.requests[-1].prompt_ids)
    assert all(c["usage"] is None for c in chunks[:-1])


def test_no_usage_field_without_include_usage(server: LiveServer) -> None:
    _, raw = stream_raw(server, {"messages": USER})
    chunks = [json.loads(d) for d in events(raw)[:-1]]
    assert all("usage" not in c and c["choices"] for c in chunks)


def test_preference_is_echoed_on_the_first_chunk(server: LiveServer) -> None:
    _, raw = stream_raw(server, {"messages": USER, "preference": {"text": "Be brief.", "method": "pref"}})
    first = json.loads(events(raw)[0])
    assert first["preference"]["text"] == "Be brief."
    assert first["preference"]["method"] == "pref"
    assert first["preference"]["coefficient"] is None


def test_engine_error_mid_stream_is_an_error_event_then_done(server: LiveServer, observer: RecordingObserver) -> None:
    response, raw = stream_raw(server, {"messages": [{"role": "user", "content": "[fail]"}]})
    assert response.status_code == 200
    data = events(raw)
    assert data[-1] == "[DONE]"
    error = json.loads(data[-2])
    assert set(error) == {"error"}
    assert set(error["error"]) == {"message", "type", "param", "code", "request_id"}
    assert error["error"]["request_id"] == response.headers["x-request-id"]
    assert error["error"]["message"] == GENERATION_FAILED_MESSAGE  # the engine's own text stays in the log
    assert error["error"]["type"] == "server_error"
    content = [json.loads(d)["choices"][0]["delta"].get("content", "") for d in data[:-2]]
    assert "".join(content) == "".join(REPLY_PIECES[:2])
    assert all(json.loads(d)["choices"][0]["finish_reason"] is None for d in data[:-2])
    assert [r.finish_reason for r in observer.records] == ["error"]


def test_exception_mid_stream_hides_details(server: LiveServer) -> None:
    _, raw = stream_raw(server, {"messages": [{"role": "user", "content": "[crash]"}]})
    data = events(raw)
    assert data[-1] == "[DONE]"
    error = json.loads(data[-2])["error"]
    assert error["message"] == INTERNAL_ERROR_MESSAGE and error["type"] == "server_error"
    assert b"secret" not in raw and b"Traceback" not in raw


def test_engine_abort_mid_stream(server: LiveServer) -> None:
    _, raw = stream_raw(server, {"messages": [{"role": "user", "content": "[abort]"}]})
    data = events(raw)
    assert data[-1] == "[DONE]"
    assert json.loads(data[-2])["error"]["code"] == "engine_not_ready"


def test_refusals_before_the_stream_keep_their_status(server: LiveServer, fake: FakeEngine) -> None:
    fake.overloaded = True
    response, _ = stream_raw(server, {"messages": USER})
    assert response.status_code == 429
    assert response.headers["retry-after"]
    assert response.json()["error"]["code"] == "engine_overloaded"
    fake.overloaded = False
    response, raw = stream_raw(server, {"messages": [{"role": "user", "content": "[crash-early]"}]})
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "server_error"
    assert b"secret" not in raw


def test_client_leaving_a_stream_aborts_the_generation(server: LiveServer, fake: FakeEngine, observer: RecordingObserver) -> None:
    body = {"messages": [{"role": "user", "content": "[slow]"}], "stream": True, "max_tokens": 250}
    with httpx.Client(timeout=30) as client, client.stream("POST", f"{server.url}/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")  # the role chunk; then leave
    wait_until(lambda: len(fake.aborted) == 1, what="the engine to see the abort")
    assert fake.aborted == [fake.requests[-1].request_id]
    assert fake.finished == []
    wait_until(lambda: len(observer.records) == 1, what="the observer record")
    assert observer.records[0].finish_reason == "abort"


def test_client_leaving_a_non_streamed_request_aborts_it(
    server: LiveServer, fake: FakeEngine, observer: RecordingObserver
) -> None:
    body = {"messages": [{"role": "user", "content": "[slow]"}], "max_tokens": 250}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=httpx.Timeout(30, read=0.3))
    wait_until(lambda: len(fake.aborted) == 1, what="the engine to see the abort")
    assert fake.finished == []
    wait_until(lambda: len(observer.records) == 1, what="the observer record")
    assert observer.records[0].finish_reason == "abort"


def test_observer_gets_one_record_per_served_request(server: LiveServer, fake: FakeEngine, observer: RecordingObserver) -> None:
    url = f"{server.url}/v1/chat/completions"
    assert httpx.post(url, json={"messages": USER, "stream": True, "max_tokens": 2}).status_code == 200
    assert httpx.post(url, json={"messages": [{"role": "user", "content": "[fail]"}]}).status_code == 500
    assert httpx.post(url, json={"messages": USER, "n": 9}).status_code == 400  # never reached the engine
    fake.overloaded = True
    assert httpx.post(url, json={"messages": USER}).status_code == 429  # refused, not served
    assert [(r.method, r.finish_reason, r.completion_tokens) for r in observer.records] == [
        ("base", "length", 2),
        ("base", "error", 2),
    ]
    assert observer.records[0].queue_s is not None and observer.records[0].ttft_s is not None
