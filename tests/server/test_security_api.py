"""Security properties of the HTTP layer (what tests/server/test_errors.py does not already cover).

* The API key is compared in constant time (``hmac.compare_digest``) and never logged: not by
  the app at DEBUG, not by ``amulet-server --log-level trace`` (a real subprocess, key from
  ``$AMULET_API_KEY``), not in error answers.
* Request bodies are bounded by default (4 MiB), with or without a key, before anything reads them.
* ``amulet-server`` sends no ``server`` header.

tests/server/test_access.py covers what is closed by default (the key on every route but the open ones,
content type, Host names, docs, /ready, the body deadline, the connection limit).
* CORS is off unless configured: no CORS headers, preflights are not answered.
* Errors never carry stack traces or exception text to clients; the server log keeps them.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.middleware.cors import CORSMiddleware

from amulet_core.engine.protocol import GenerationOutput, GenerationRequest
from benchmarks.load import server_process
from server.app import create_app
from server.assembly import build_app
from server.config import DEFAULT_MAX_BODY_BYTES, ServerConfig
from server.errors import INTERNAL_ERROR_MESSAGE
from server.options import parse_args
from tests.support.fake_engine import FakeEngine
from tests.support.http import API_KEY, USER, WRONG_KEY, assert_no_leak
from tests.support.live_server import live_server

SECRET = "secret-internal-detail /srv/weights/model.bin"
JSON = {"Content-Type": "application/json"}


# ---------------------------------------------------------------- the API key


def test_the_key_is_compared_with_compare_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real_compare = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real_compare(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    with live_server(create_app(FakeEngine(), ServerConfig(api_key=API_KEY))) as server:
        url = f"{server.url}/v1/chat/completions"
        for key, status in ((API_KEY, 200), (WRONG_KEY, 401), (API_KEY[:-1], 401), (API_KEY + "x", 401)):
            calls.clear()
            response = httpx.post(url, json={"messages": USER}, headers={"Authorization": f"Bearer {key}"})
            assert response.status_code == status
            assert calls == [(f"Bearer {key}".encode(), f"Bearer {API_KEY}".encode())]
            assert_no_leak(response, API_KEY, WRONG_KEY)
        calls.clear()
        assert httpx.post(url, json={"messages": USER}).status_code == 401  # no header: nothing to compare
        assert calls == []


def test_the_key_is_not_logged_by_the_app(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeEngine()
    with caplog.at_level(logging.DEBUG), live_server(create_app(fake, ServerConfig(api_key=API_KEY))) as server:
        url = f"{server.url}/v1/chat/completions"
        for key in (API_KEY, WRONG_KEY):
            headers = {"Authorization": f"Bearer {key}"}
            httpx.post(url, json={"messages": USER, "stream": True}, headers=headers)
            httpx.post(url, json={"messages": [{"role": "user", "content": "[crash]"}], "stream": True}, headers=headers)
            httpx.post(url, content=b"{bad json", headers=headers | JSON)
    text = "\n".join(f"{r.getMessage()} {r.exc_text or ''} {r.__dict__}" for r in caplog.records)
    assert any("secret internal detail" in (r.exc_text or "") for r in caplog.records)  # the app did log
    assert API_KEY not in text and WRONG_KEY not in text
    assert API_KEY not in repr(ServerConfig(api_key=API_KEY))


@pytest.mark.smollm
def test_the_key_is_not_logged_by_the_server_at_trace_level(tmp_path: Path, tiny_model_folder: str) -> None:
    args = ["--model", tiny_model_folder, "--log-level", "trace", "--dtype", "float32", "--max-model-len", "256"]
    env = {"AMULET_API_KEY": API_KEY, "OMP_NUM_THREADS": "1"}
    with server_process(args, tmp_path / "server.log", env) as server:
        url = f"{server.url}/v1/chat/completions"
        good, bad = {"Authorization": f"Bearer {API_KEY}"}, {"Authorization": f"Bearer {WRONG_KEY}"}
        body = {"messages": USER, "max_tokens": 2}
        assert httpx.post(url, json=body, headers=good, timeout=120).status_code == 200
        assert httpx.post(url, json=body | {"stream": True}, headers=good, timeout=120).status_code == 200
        assert httpx.post(url, json=body | {"temperature": -1}, headers=good, timeout=120).status_code == 400
        assert httpx.post(url, json=body, headers=bad, timeout=120).status_code == 401
        assert httpx.get(f"{server.url}/v1/models", headers=bad).status_code == 401
        models = httpx.get(f"{server.url}/v1/models", headers=good)
        assert models.status_code == 200 and "server" not in models.headers  # amulet-server's uvicorn names no server
    log = server.log()
    assert "ASGI" in log and "chat/completions" in log  # trace logging was on
    assert API_KEY not in log and WRONG_KEY not in log


# ---------------------------------------------------------------- request bodies are bounded


def test_bodies_are_bounded_by_default() -> None:
    assert parse_args([], environ={}).server.max_body_bytes == DEFAULT_MAX_BODY_BYTES == 4 * 1024 * 1024
    fake = FakeEngine()
    oversized = b'{"messages": [{"role": "user", "content": "' + b"x" * DEFAULT_MAX_BODY_BYTES + b'"}]}'
    for config, headers in (
        (ServerConfig(), JSON),
        (ServerConfig(api_key=API_KEY), JSON | {"Authorization": f"Bearer {API_KEY}"}),
    ):
        with live_server(create_app(fake, config)) as server:
            for path in ("/v1/chat/completions", "/v1/models", "/health"):
                response = httpx.post(f"{server.url}{path}", content=oversized, headers=headers, timeout=60)
                assert response.status_code == 413, (path, response.status_code)
                assert response.json()["error"]["code"] == "request_too_large"
            if config.api_key:  # without the key the body is refused before anything reads it
                assert (
                    httpx.post(f"{server.url}/v1/chat/completions", content=oversized, headers=JSON, timeout=60).status_code
                    == 401
                )
    assert fake.requests == []


# ---------------------------------------------------------------- CORS


def test_cors_is_off_unless_configured() -> None:
    default = build_app(parse_args([], environ={}))
    assert not any(m.cls is CORSMiddleware for m in default.user_middleware)
    configured = build_app(parse_args(["--cors-origins", "https://app.example"], environ={}))
    assert any(m.cls is CORSMiddleware for m in configured.user_middleware)

    origin = {"Origin": "https://evil.example"}
    with live_server(create_app(FakeEngine(), ServerConfig())) as server:
        for response in (
            httpx.get(f"{server.url}/v1/models", headers=origin),
            httpx.get(f"{server.url}/health", headers=origin),
            httpx.post(f"{server.url}/v1/chat/completions", json={"messages": USER}, headers=origin),
        ):
            assert response.status_code == 200
            assert not any(h.startswith("access-control-") for h in response.headers)
        preflight = httpx.options(
            f"{server.url}/v1/chat/completions",
            headers=origin | {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"},
        )
        assert preflight.status_code == 405
        assert not any(h.startswith("access-control-") for h in preflight.headers)


# ---------------------------------------------------------------- no stack traces to clients


class BrokenEngine(FakeEngine):
    """A fake engine that fails in the places the fake does not: the tokenizer, mid-generation, stats."""

    def encode_text(self, text: str) -> tuple[int, ...]:
        if "[tokenizer]" in text:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, SECRET)
        return super().encode_text(text)

    async def _generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        count = 0
        async for out in super()._generate(request):
            count += 1
            if count == 2 and "[late]" in "".join(chr(i) for i in request.prompt_ids):
                raise KeyError(SECRET)
            yield out


def test_errors_never_carry_tracebacks_or_exception_text(caplog: pytest.LogCaptureFixture) -> None:
    app = create_app(BrokenEngine(), ServerConfig())
    assert app.debug is False
    url_of = "{}/v1/chat/completions".format
    with caplog.at_level(logging.ERROR), live_server(app) as server:
        url = url_of(server.url)
        for content, stream in (("[tokenizer]", False), ("[tokenizer]", True), ("[late]", False)):
            response = httpx.post(url, json={"messages": [{"role": "user", "content": content}], "stream": stream})
            assert response.status_code == 500
            error = response.json()["error"]
            assert (error["type"], error["code"]) == ("server_error", "internal_error")
            assert error["message"] == INTERNAL_ERROR_MESSAGE
            assert_no_leak(response, SECRET, "UnicodeDecodeError", "KeyError")
        streamed = httpx.post(url, json={"messages": [{"role": "user", "content": "[late]"}], "stream": True})
        assert streamed.status_code == 200 and streamed.text.endswith("data: [DONE]\n\n")
        assert INTERNAL_ERROR_MESSAGE in streamed.text
        assert_no_leak(streamed, SECRET, "KeyError")
    logged = "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    assert SECRET in logged  # the operator still gets the details
