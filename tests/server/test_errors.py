"""Every error answer is OpenAI-shaped with the right status (httpx against a real server)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from server.app import MODEL_LOAD_FAILED_MESSAGE, create_app
from server.config import ServerConfig
from server.errors import GENERATION_FAILED_MESSAGE
from tests.support.fake_engine import FakeEngine
from tests.support.http import API_KEY, USER, assert_openai_error
from tests.support.live_server import LiveServer, live_server

MAX_MODEL_LEN = 200
BODY_LIMIT = 2048


@pytest.fixture(scope="module")
def fake_engine() -> FakeEngine:
    return FakeEngine(max_model_len=MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def server_config() -> ServerConfig:
    return ServerConfig(max_body_bytes=BODY_LIMIT)


def post(server: LiveServer, body: Any = None, **kwargs: Any) -> httpx.Response:
    if body is not None:
        kwargs["json"] = body
    return httpx.post(f"{server.url}/v1/chat/completions", timeout=30, **kwargs)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "function", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user"}]}, "messages[0]"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages[0].content[0]",
        ),
        ({"messages": USER, "temperature": "hot"}, "temperature"),
        ({"messages": USER, "temperature": 500}, "temperature"),
        ({"messages": USER, "top_p": 0}, "top_p"),
        ({"messages": USER, "max_tokens": 0}, "max_tokens"),
        ({"messages": USER, "stop": [1]}, "stop[0]"),
        ({"messages": USER, "n": 9}, "n"),
        ({"messages": USER, "n": 0}, "n"),
        ({"messages": USER, "top_logprobs": 2}, "top_logprobs"),
        ({"messages": USER, "stream_options": {"include_usage": True}}, "stream_options"),
        ({"messages": USER, "tools": [{"type": "function"}]}, "tools[0].function"),
        ({"messages": USER, "preference": ""}, "preference"),
        ({"messages": USER, "preference": {"text": "x", "colour": "red"}}, "preference.colour"),
        ({"messages": USER, "preference": {"text": "x", "method": "magic"}}, "preference.method"),
        ({"messages": USER, "preference": {"text": "x", "iterations": -1}}, "preference.iterations"),
        ({"messages": USER, "preference": {"text": "x", "lambda": 0}}, "preference.lambda"),
        ({"messages": USER, "preference": {"method": "la"}}, "preference.text"),
    ],
)
def test_invalid_parameters_are_400_naming_the_param(server: LiveServer, body: dict[str, Any], param: str) -> None:
    error = assert_openai_error(post(server, body), 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


def test_malformed_json_is_400(server: LiveServer) -> None:
    for content in (b"{not json", b"", b"[1, 2]"):
        error = assert_openai_error(post(server, content=content, headers={"content-type": "application/json"}), 400)
        assert error["type"] == "invalid_request_error"


def test_context_too_long(server: LiveServer, fake: FakeEngine) -> None:
    long = [{"role": "user", "content": "x" * MAX_MODEL_LEN}]
    error = assert_openai_error(post(server, {"messages": long}), 400)
    assert (error["code"], error["param"]) == ("context_length_exceeded", "messages")
    prompt = len(fake.encode_chat(USER))
    error = assert_openai_error(post(server, {"messages": USER, "max_tokens": MAX_MODEL_LEN - prompt + 1}), 400)
    assert (error["code"], error["param"]) == ("context_length_exceeded", "max_tokens")
    assert post(server, {"messages": USER, "max_tokens": MAX_MODEL_LEN - prompt}).status_code == 200
    # With a preference the longer (pref) context counts.
    body = {"messages": USER, "max_completion_tokens": MAX_MODEL_LEN - prompt, "preference": "concise"}
    error = assert_openai_error(post(server, body), 400)
    assert (error["code"], error["param"]) == ("context_length_exceeded", "max_completion_tokens")
    assert fake.requests and all(len(r.prompt_ids) < MAX_MODEL_LEN for r in fake.requests)


def test_unknown_model_is_404_but_missing_or_served_name_is_fine(server: LiveServer) -> None:
    error = assert_openai_error(post(server, {"messages": USER, "model": "gpt-4o"}), 404)
    assert (error["code"], error["param"]) == ("model_not_found", "model")
    for model in ("fake-model", "", None):
        assert post(server, {"messages": USER, "model": model}).status_code == 200
    assert_openai_error(httpx.get(f"{server.url}/v1/models/nope"), 404)


def test_unknown_route_and_wrong_method(server: LiveServer) -> None:
    assert assert_openai_error(httpx.get(f"{server.url}/v1/nothing"), 404)["code"] == "not_found"
    assert_openai_error(httpx.get(f"{server.url}/v1/chat/completions"), 405)


def test_full_queue_is_429_with_retry_after(server: LiveServer, fake: FakeEngine) -> None:
    fake.overloaded = True
    response = post(server, {"messages": USER})
    error = assert_openai_error(response, 429)
    assert error["code"] == "engine_overloaded"
    assert int(response.headers["retry-after"]) >= 1


def test_not_ready_is_503_with_retry_after(server: LiveServer, fake: FakeEngine) -> None:
    fake.ready = False
    response = post(server, {"messages": USER})
    assert assert_openai_error(response, 503)["code"] == "engine_not_ready"
    assert int(response.headers["retry-after"]) >= 1
    ready = httpx.get(f"{server.url}/ready")
    assert assert_openai_error(ready, 503)["code"] == "engine_not_ready"
    assert httpx.get(f"{server.url}/health/ready").status_code == 503
    assert httpx.get(f"{server.url}/health").status_code == 200
    fake.load_error = ValueError("no such model file")
    failed = httpx.get(f"{server.url}/ready")
    message = assert_openai_error(failed, 503)["message"]
    assert message == MODEL_LOAD_FAILED_MESSAGE and "no such model file" not in message  # the details stay in the log
    fake.load_error = None
    fake.ready = True
    assert httpx.get(f"{server.url}/ready").status_code == 200
    assert httpx.get(f"{server.url}/health/ready").status_code == 200


def test_unexpected_exception_is_500_without_details(server: LiveServer) -> None:
    response = post(server, {"messages": [{"role": "user", "content": "[crash-early]"}]})
    error = assert_openai_error(response, 500)
    assert (error["type"], error["code"]) == ("server_error", "internal_error")
    assert "secret" not in response.text


def test_engine_failure_is_500_and_engine_abort_503(server: LiveServer) -> None:
    error = assert_openai_error(post(server, {"messages": [{"role": "user", "content": "[fail]"}]}), 500)
    assert error["message"] == GENERATION_FAILED_MESSAGE and error["code"] == "generation_failed"  # no engine text
    response = post(server, {"messages": [{"role": "user", "content": "[abort]"}]})
    assert assert_openai_error(response, 503)["code"] == "engine_not_ready"
    assert response.headers["retry-after"]


def test_body_over_the_limit_is_413(server: LiveServer, fake: FakeEngine) -> None:
    big = {"messages": [{"role": "user", "content": "x" * (BODY_LIMIT + 10)}]}
    assert assert_openai_error(post(server, big), 413)["code"] == "request_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer encoding
        yield b'{"messages": [{"role": "user", "content": "'
        yield b"x" * (BODY_LIMIT + 10)
        yield b'"}]}'

    chunked = post(server, content=chunks(), headers={"content-type": "application/json"})
    assert assert_openai_error(chunked, 413)["code"] == "request_too_large"
    assert fake.requests == []

    def small() -> Iterator[bytes]:
        yield b'{"messages": [{"role": "user",'
        yield b' "content": "hi"}]}'

    assert post(server, content=small(), headers={"content-type": "application/json"}).status_code == 200


def test_a_body_that_is_not_declared_json_is_415(server: LiveServer, fake: FakeEngine) -> None:
    # curl -d sends application/x-www-form-urlencoded unless told otherwise; a web page can post that
    # cross-origin without a preflight, so the server does not read it as JSON.
    response = post(
        server,
        content=b'{"messages": [{"role": "user", "content": "hi"}]}',
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert assert_openai_error(response, 415)["code"] == "unsupported_media_type"
    assert fake.requests == []
    assert post(server, {"messages": USER}).status_code == 200


def test_api_key() -> None:
    with live_server(create_app(FakeEngine(), ServerConfig(api_key=API_KEY))) as server:
        url = f"{server.url}/v1/chat/completions"
        body = {"messages": USER}
        missing = httpx.post(url, json=body)
        assert assert_openai_error(missing, 401)["code"] == "invalid_api_key"
        assert missing.headers["www-authenticate"] == "Bearer"
        wrong = httpx.post(url, json=body, headers={"Authorization": "Bearer sk-wrong"})
        assert assert_openai_error(wrong, 401)["code"] == "invalid_api_key"
        assert API_KEY not in wrong.text
        # Refused before the body is read: a malformed body still gets 401, not 400.
        assert httpx.post(url, content=b"{bad").status_code == 401
        assert httpx.get(f"{server.url}/v1/models").status_code == 401
        good = {"Authorization": f"Bearer {API_KEY}"}
        assert httpx.post(url, json=body, headers=good).status_code == 200
        assert httpx.get(f"{server.url}/v1/models", headers=good).status_code == 200
        assert httpx.get(f"{server.url}/health").status_code == 200
        assert httpx.get(f"{server.url}/ready").status_code == 200


def test_cors_is_off_by_default_and_on_when_configured(server: LiveServer) -> None:
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    plain = httpx.options(f"{server.url}/v1/chat/completions", headers=preflight)
    assert "access-control-allow-origin" not in plain.headers
    config = ServerConfig(cors_origins=("https://app.example",), api_key=API_KEY)
    with live_server(create_app(FakeEngine(), config)) as cors_server:
        allowed = httpx.options(
            f"{cors_server.url}/v1/chat/completions", headers={**preflight, "Access-Control-Request-Headers": "authorization"}
        )
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "https://app.example"
        other = httpx.options(f"{cors_server.url}/v1/chat/completions", headers={**preflight, "Origin": "https://evil.example"})
        assert other.headers.get("access-control-allow-origin") != "https://evil.example"


def test_config_repr_hides_the_key() -> None:
    assert API_KEY not in repr(ServerConfig(api_key=API_KEY))
