"""Callers cannot see each other through the prefix cache (issue 27, tenants), over HTTP with the real engine.

``cached_tokens`` reveals whether an earlier request began with the same tokens. With several API keys each
key is its own tenant: a caller is served from (and told about) only its own key's cached blocks. Within a
key, ``cache_salt`` parts callers further: only requests of the same salt share cached blocks. The answer
is the same whoever asks; only the cache use differs.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from amulet_core.engine.config import EngineConfig
from server.config import ServerConfig
from tests.support.http import assert_openai_error
from tests.support.live_server import EngineServer, engine_server

KEY_A, KEY_B = "sk-tenant-a", "sk-tenant-b"
SMALL = EngineConfig(max_model_len=256, kv_cache_tokens=2048, max_num_seqs=8)


@pytest.fixture(scope="module")
def running(tiny_model) -> Iterator[EngineServer]:
    config = ServerConfig(api_key=KEY_A, extra_api_keys=(KEY_B,))
    with engine_server(tiny_model("llama"), SMALL, server_config=config) as server:
        yield server


def ask(running: EngineServer, key: str, text: str, **fields: Any) -> httpx.Response:
    """A chat whose system message is the text itself: no earlier test's request shares its first block."""
    messages = [{"role": "system", "content": text}, {"role": "user", "content": "Go on."}]
    body = {"messages": messages, "max_tokens": 4, "temperature": 0, **fields}
    return httpx.post(running.chat_url, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=120)


def answered(response: httpx.Response) -> tuple[str, int]:
    assert response.status_code == 200, response.text
    body = response.json()
    return body["choices"][0]["message"]["content"], body["usage"]["prompt_tokens_details"]["cached_tokens"]


def long_text(topic: str) -> str:
    return f"Tell me about {topic}. " + "Please answer with care and in plain words. " * 8


def test_another_key_sees_no_cached_tokens_of_a_key(running: EngineServer) -> None:
    text = long_text("the sea")
    first, cached = answered(ask(running, KEY_A, text))
    assert cached == 0
    other, cached = answered(ask(running, KEY_B, text))
    assert cached == 0, "key B was served from key A's cached prompt"
    assert other == first
    again, cached = answered(ask(running, KEY_A, text))
    assert cached >= 32 and again == first  # the same key is served from its cache


def test_a_salt_sees_no_cached_tokens_of_another_salt(running: EngineServer) -> None:
    text = long_text("mountains")
    first, cached = answered(ask(running, KEY_A, text, cache_salt="alice"))
    assert cached == 0
    for salt in ("bob", None):
        fields = {} if salt is None else {"cache_salt": salt}
        answer, cached = answered(ask(running, KEY_A, text, **fields))
        assert cached == 0, f"salt {salt!r} saw the cached prompt of salt 'alice'"
        assert answer == first
    _, cached = answered(ask(running, KEY_B, text, cache_salt="alice"))
    assert cached == 0, "the same salt under another key shares nothing"
    again, cached = answered(ask(running, KEY_A, text, cache_salt="alice"))
    assert cached >= 32 and again == first


def test_text_completions_are_salted_too(running: EngineServer) -> None:
    url = f"{running.url}/v1/completions"
    body = {"prompt": long_text("rivers"), "max_tokens": 2, "temperature": 0}

    def cached(key: str, **fields: Any) -> int:
        response = httpx.post(url, json={**body, **fields}, headers={"Authorization": f"Bearer {key}"}, timeout=120)
        assert response.status_code == 200, response.text
        return response.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    assert cached(KEY_A) == 0
    assert cached(KEY_B) == 0
    assert cached(KEY_A, cache_salt="s") == 0
    assert cached(KEY_A) >= 32


@pytest.mark.parametrize("salt", ["", "x" * 257, 7, ["a"]])
def test_a_bad_salt_is_400_naming_it(running: EngineServer, salt: Any) -> None:
    error = assert_openai_error(ask(running, KEY_A, "Hi", cache_salt=salt), 400)
    assert error["param"] == "cache_salt"
    answered(ask(running, KEY_A, "Hi"))  # still serving
