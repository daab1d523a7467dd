"""The request path's phases in order (server.requests): a bad field is refused before the chat template or
the tokenizer runs, and a conversation too long to fit is refused by its characters before the tokenizer.

The fake engine is its own renderer and records every renderer call (``renderer_calls``), so each test
tells exactly how far a request got.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from amulet_core.errors import ContextLengthExceededError, InvalidParameterError
from server.config import ServerConfig
from server.protocol import ChatCompletionRequest
from server.protocol_completions import CompletionRequest
from server.requests import chat, completion
from server.requests.admission import Admission, FixedLimits
from server.tool_parsers import get_tool_parser
from tests.support.fake_engine import FakeEngine
from tests.support.http import assert_openai_error
from tests.support.live_server import LiveServer

MAX_MODEL_LEN = 512
THREE_MB = "x" * (3 * 1024 * 1024)


@pytest.fixture(scope="module")
def fake_engine() -> FakeEngine:
    return FakeEngine(max_model_len=MAX_MODEL_LEN)


def admission(fake: FakeEngine) -> Admission:
    return Admission("fake-model", ServerConfig(), fake, lambda: get_tool_parser("hermes"))


def chat_body(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "Hi"}], **fields})


def test_an_invalid_sampling_field_with_a_3_mb_message_is_refused_before_any_renderer_call(
    server: LiveServer, fake: FakeEngine
) -> None:
    body = {"messages": [{"role": "user", "content": THREE_MB}], "temperature": -1, "preference": "concise"}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert assert_openai_error(response, 400)["param"] == "temperature"
    assert fake.renderer_calls == [] and fake.requests == []


def test_a_3_mb_message_is_refused_by_its_length_before_the_tokenizer_runs(server: LiveServer, fake: FakeEngine) -> None:
    body = {"messages": [{"role": "user", "content": THREE_MB}], "preference": "concise"}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    error = assert_openai_error(response, 400)
    assert error["param"] == "messages"
    assert "maximum context length is 512 tokens" in error["message"]
    assert "encode_text" not in fake.renderer_calls and fake.requests == []


def test_a_3_mb_completion_prompt_is_refused_before_the_tokenizer_runs(server: LiveServer, fake: FakeEngine) -> None:
    response = httpx.post(f"{server.url}/v1/completions", json={"prompt": THREE_MB, "max_tokens": 4}, timeout=60)
    assert assert_openai_error(response, 400)["param"] == "prompt"
    assert fake.renderer_calls == [] and fake.requests == []


def test_a_message_just_within_the_character_bound_reaches_the_tokenizer(fake: FakeEngine) -> None:
    # The fake's tokens are one character each: 400 characters of message fit in 512 tokens with the template.
    prepared = asyncio.run(
        chat.prepare(chat_body(messages=[{"role": "user", "content": "y" * 400}]), lambda: fake, admission(fake))
    )
    assert fake.renderer_calls == ["chat_text", "encode_text"]
    assert len(prepared.request.prompt_ids) == len(fake.chat_text(list(prepared.intent.messages)))


def test_admission_needs_no_renderer_and_names_the_field() -> None:
    limits = FixedLimits(max_model_len=MAX_MODEL_LEN, vocab_size=100)

    def no_parser() -> Any:
        raise AssertionError("no tools, no parser")

    checks = Admission("fake-model", ServerConfig(), limits, no_parser)
    intent = chat.admit(chat_body(preference="concise", max_tokens=5), checks)
    assert intent.plan is not None and intent.sampling.max_tokens == 5 and intent.max_tokens_param == "max_tokens"
    with pytest.raises(InvalidParameterError) as caught:
        chat.admit(chat_body(max_completion_tokens=-3), checks)
    assert caught.value.param == "max_completion_tokens"
    with pytest.raises(InvalidParameterError) as caught:
        completion.admit(CompletionRequest.model_validate({"prompt": [5, 100]}), checks)
    assert caught.value.param == "prompt"


def test_every_phase_is_entered_once_in_order(fake: FakeEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    for phase in ("admit", "render", "encode", "assemble"):
        original = getattr(chat, phase)

        def wrapped(*args: Any, _original: Any = original, _phase: str = phase) -> Any:
            seen.append(_phase)
            return _original(*args)

        monkeypatch.setattr(chat, phase, wrapped)
    body = chat_body(preference=["concise", "formal"])
    prepared = asyncio.run(chat.prepare(body, lambda: fake, admission(fake)))
    assert seen == ["admit", "render", "encode", "assemble"]
    assert len(prepared.request.contexts) == 3  # two preferences and the contrast


def test_the_character_bound_never_refuses_what_the_tokens_would_fit(fake: FakeEngine) -> None:
    # A text of exactly max_model_len * max_token_chars characters passes the bound; the token rule decides.
    with pytest.raises(ContextLengthExceededError) as caught:
        asyncio.run(chat.prepare(chat_body(messages=[{"role": "user", "content": "z" * 600}]), lambda: fake, admission(fake)))
    assert caught.value.param == "messages"
    assert "encode_text" not in fake.renderer_calls  # 600 characters plus the template exceed 512 characters
    fake.reset()
    text = fake.chat_text([{"role": "user", "content": "z" * 490}])
    assert len(text) <= MAX_MODEL_LEN
    with pytest.raises(ContextLengthExceededError):  # fits the characters, leaves no room for an answer of 64
        asyncio.run(
            chat.prepare(
                chat_body(messages=[{"role": "user", "content": "z" * 490}], max_tokens=64), lambda: fake, admission(fake)
            )
        )
    assert fake.renderer_calls[-1] == "encode_text"
