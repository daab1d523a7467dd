"""The request path's phases in order (server.requests): a bad field is refused before the chat template or
the tokenizer runs, and a conversation too long to fit is refused by its characters before the tokenizer.

The fake engine is its own renderer and records every renderer call (``renderer_calls``), so each test
tells exactly how far a request got.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from typing import Any

import httpx
import pytest

from amulet_core.errors import ContextLengthExceededError, InvalidParameterError
from server.config import ServerConfig
from server.protocol import ChatCompletionRequest
from server.protocol_completions import CompletionRequest
from server.requests import chat, completion
from server.requests.admission import Admission
from server.tool_parsers import get_tool_parser
from tests.support.fake_engine import FakeEngine
from tests.support.http import assert_openai_error
from tests.support.live_server import LiveServer

MAX_MODEL_LEN = 2048
THREE_MB = "x" * (3 * 1024 * 1024)


@pytest.fixture(scope="module")
def fake_engine() -> FakeEngine:
    return FakeEngine(max_model_len=MAX_MODEL_LEN)


def admission(fake: FakeEngine) -> Admission:
    return Admission(
        "fake-model", ServerConfig(), lambda: fake.max_model_len, lambda: fake.vocab_size, lambda: get_tool_parser("hermes")
    )


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
    assert "maximum context length is 2048 tokens" in error["message"]
    assert "encode_text" not in fake.renderer_calls and fake.requests == []


def test_a_3_mb_completion_prompt_is_refused_before_the_tokenizer_runs(server: LiveServer, fake: FakeEngine) -> None:
    response = httpx.post(f"{server.url}/v1/completions", json={"prompt": THREE_MB, "max_tokens": 4}, timeout=60)
    assert assert_openai_error(response, 400)["param"] == "prompt"
    assert fake.renderer_calls == [] and fake.requests == []


def test_a_message_just_within_the_character_bound_reaches_the_tokenizer(fake: FakeEngine) -> None:
    # The fake's tokens are one character each: 1,800 characters of message fit in 2,048 tokens with the template.
    prepared = asyncio.run(
        chat.prepare(chat_body(messages=[{"role": "user", "content": "y" * 1800}]), lambda: fake, admission(fake))
    )
    assert fake.renderer_calls == ["chat_text", "encode_text"]
    assert len(prepared.request.prompt_ids) == len(fake.chat_text(list(prepared.intent.messages)))


def test_admission_needs_no_renderer_and_names_the_field() -> None:
    def no_parser() -> Any:
        raise AssertionError("no tools, no parser")

    checks = Admission("fake-model", ServerConfig(), lambda: MAX_MODEL_LEN, lambda: 100, no_parser)
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
        asyncio.run(chat.prepare(chat_body(messages=[{"role": "user", "content": "z" * 2100}]), lambda: fake, admission(fake)))
    assert caught.value.param == "messages"
    assert "encode_text" not in fake.renderer_calls  # 2,100 characters exceed 2,048
    fake.reset()
    text = fake.chat_text([{"role": "user", "content": "z" * 1990}])
    assert len(text) <= MAX_MODEL_LEN
    with pytest.raises(ContextLengthExceededError):  # fits the characters, leaves no room for an answer of 64
        asyncio.run(
            chat.prepare(
                chat_body(messages=[{"role": "user", "content": "z" * 1990}], max_tokens=64), lambda: fake, admission(fake)
            )
        )
    assert fake.renderer_calls[-1] == "encode_text"


def test_a_chat_body_passes_each_module_once_from_the_endpoint_to_the_generation_request(fake: FakeEngine) -> None:
    """The product modules ``server.requests.chat`` calls into, in order, for a request with two preferences, a
    negative one, tools and a response format: each is entered in one stretch, none again later. The request's
    own types (``server.protocol``, ``protocol_base``, ``protocol_messages``) and the injected renderer (here the
    fake) are not steps of the path."""
    entered: list[str] = []

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event != "call" or frame.f_back is None:
            return
        callee, caller = frame.f_globals.get("__name__", ""), frame.f_back.f_globals.get("__name__", "")
        own_types = callee in ("server.protocol", "server.protocol_base", "server.protocol_messages")
        product = callee.startswith(("server.", "amulet_core.")) and callee != caller and not own_types
        if caller == "server.requests.chat" and product and (not entered or entered[-1] != callee):
            entered.append(callee)

    body = chat_body(
        preference={"text": ["concise", "formal"], "negative": "verbose"},
        tools=[{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}],
        response_format={"type": "json_object"},
    )
    threading.setprofile(profile)
    sys.setprofile(profile)
    try:
        prepared = asyncio.run(chat.prepare(body, lambda: fake, admission(fake)))
    finally:
        sys.setprofile(None)
        threading.setprofile(None)  # type: ignore[arg-type]
    assert len(prepared.request.contexts) == 3
    assert entered == [
        "server.requests.admission",  # admit: the model, the policy, n
        "server.requests.tools",
        "server.requests.grammar",
        "server.requests.fields",  # SamplingParams, the template options
        "server.requests.preference",  # the plan and its MethodSettings
        "server.requests.admission",  # the fan-out budget; rendering and encoding go to the preparation pool
        "amulet_core.method.preference_prompts",  # render: the K + 1 conversations
        "server.requests.tool_prompts",  # the tools written into them (the fake template renders none)
        "server.requests.encoding",  # encode: the length in characters, then the tokenizer
        "server.requests.tenancy",  # the prefix cache's salt
        "amulet_core.engine.protocol",  # assemble: the GenerationRequest
    ], "\n".join(entered)
