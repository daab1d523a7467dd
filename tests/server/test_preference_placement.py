"""Where a preference request's sentences go (``preference.placement``, ``--preference-placement``), through
HTTP over the fake engine: the contexts the engine receives are the core's ``preference_contexts`` for the
resolved placement, the ``end`` placement's contexts share the conversation before the last user message,
the server's default and the paper's mode give way to the request's own value, and the echo reports it."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import pytest

from amulet_core.engine.protocol import GenerationRequest
from amulet_core.method.preference_prompts import NEUTRAL_SYSTEM_PROMPT, Placement, preference_contexts
from amulet_core.method.settings import Method, MethodSettings
from server.app import create_app
from server.config import ServerConfig
from server.options import parse_args
from tests.support.fake_engine import FakeEngine, render
from tests.support.http import assert_openai_error
from tests.support.live_server import LiveServer, live_server

CONVERSATION = [
    {"role": "user", "content": "What is a tide?"},
    {"role": "assistant", "content": "The rise and fall of the sea."},
    {"role": "user", "content": "Why?"},
]
CONCISE = "Your answer should be concise as much as possible."


@pytest.fixture(scope="module")
def server_config() -> ServerConfig:
    """The module's first server runs with ``--preference-placement system`` (the built-in default is end)."""
    return ServerConfig(preference_placement=Placement.SYSTEM)


@pytest.fixture(scope="module")
def end_server() -> Iterator[tuple[LiveServer, FakeEngine]]:
    """A second server, started with ``--preference-placement end``, and its fake engine."""
    engine = FakeEngine()
    with live_server(create_app(engine, ServerConfig(preference_placement=Placement.END))) as running:
        yield running, engine


@pytest.fixture
def end(end_server: tuple[LiveServer, FakeEngine]) -> tuple[LiveServer, FakeEngine]:
    end_server[1].reset()
    return end_server


def chat(server: LiveServer, messages: Sequence[dict[str, Any]] = CONVERSATION, **fields: Any) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/chat/completions", json={"messages": messages, "max_tokens": 4, **fields}, timeout=30)


def answer(server: LiveServer, fake: FakeEngine, **fields: Any) -> tuple[dict[str, Any], GenerationRequest]:
    response = chat(server, **fields)
    assert response.status_code == 200, response.text
    return response.json(), fake.requests[-1]


def ids(messages: Sequence[dict[str, Any]]) -> tuple[int, ...]:
    """The fake engine's token ids of a conversation (one per character of its template's text)."""
    return tuple(ord(c) for c in render(messages))


def contexts(request: GenerationRequest) -> list[tuple[int, ...]]:
    """Every context of the request, the decoded one first and the contrast one last."""
    contrast = [request.contrast_prompt_ids] if request.contrast_prompt_ids is not None else []
    return [request.prompt_ids, *request.extra_prompt_ids, *contrast]


def expected(
    preferences: Sequence[str], placement: Placement, negative: str | None = None, method: Method = Method.AMULET
) -> list[tuple[int, ...]]:
    """The contexts the core builds for the conversation (given the neutral system message: the fake's
    template has no default of its own), as the fake engine encodes them."""
    built = preference_contexts(CONVERSATION, preferences, NEUTRAL_SYSTEM_PROMPT, negative, placement)
    return [ids(c) for c in built.decoded_by(method)]


def common_prefix(*lists: Sequence[int]) -> int:
    return next((i for i, column in enumerate(zip(*lists, strict=False)) if len(set(column)) > 1), min(map(len, lists)))


SHARED = len(render([{"role": "system", "content": NEUTRAL_SYSTEM_PROMPT}, *CONVERSATION[:-1]], add_generation_prompt=False))
"""The fake's token ids of the conversation before the last user message (its system message included)."""


@pytest.mark.parametrize("placement", list(Placement))
@pytest.mark.parametrize("preferences", [["concise"], ["concise", "formal"]], ids=["K=1", "K=2"])
def test_the_engine_gets_the_cores_contexts_for_the_placement(
    server: LiveServer, fake: FakeEngine, placement: Placement, preferences: list[str]
) -> None:
    body, request = answer(server, fake, preference={"text": preferences, "placement": placement.value})
    assert contexts(request) == expected(preferences, placement)
    assert len(request.extra_prompt_ids) == len(preferences) - 1 and request.contrast_prompt_ids is not None
    assert body["preference"]["placement"] == placement.value
    shared = common_prefix(*contexts(request))
    if placement is Placement.END:  # every earlier turn, and the last user message up to the sentence
        assert shared >= SHARED + len("<|user|>Why?")
    else:  # the contexts part at the end of the system message
        assert shared == len(f"<|system|>{NEUTRAL_SYSTEM_PROMPT}")


def test_the_server_default_applies_and_the_requests_value_wins(
    server: LiveServer, fake: FakeEngine, end: tuple[LiveServer, FakeEngine]
) -> None:
    end_url, end_fake = end
    for preference in ("concise", ["concise"], {"text": "concise"}, {"text": "concise", "mode": "default"}):
        body, request = answer(end_url, end_fake, preference=preference)
        assert contexts(request) == expected(["concise"], Placement.END), preference
        assert body["preference"]["placement"] == "end"
        body, request = answer(server, fake, preference=preference)  # the server started with system
        assert contexts(request) == expected(["concise"], Placement.SYSTEM), preference
        assert body["preference"]["placement"] == "system"
    body, request = answer(end_url, end_fake, preference={"text": "concise", "placement": "system"})
    assert contexts(request) == expected(["concise"], Placement.SYSTEM) and body["preference"]["placement"] == "system"


def test_paper_mode_keeps_the_system_placement_unless_the_request_says_end(end: tuple[LiveServer, FakeEngine]) -> None:
    end_url, end_fake = end
    body, request = answer(end_url, end_fake, preference={"text": "concise", "mode": "paper"})
    assert request.method == MethodSettings.paper()
    assert contexts(request) == expected(["concise"], Placement.SYSTEM) and body["preference"]["placement"] == "system"
    body, request = answer(end_url, end_fake, preference={"text": "concise", "mode": "paper", "placement": "end"})
    assert request.method == MethodSettings.paper()
    assert contexts(request) == expected(["concise"], Placement.END) and body["preference"]["placement"] == "end"


@pytest.mark.parametrize("placement", list(Placement))
def test_a_negative_preference_goes_where_the_placement_says(server: LiveServer, fake: FakeEngine, placement: Placement) -> None:
    preference = {"text": ["verbose", "formal"], "negative": "concise", "placement": placement.value}
    body, request = answer(server, fake, preference=preference)
    assert contexts(request) == expected(["verbose", "formal"], placement, negative="concise")
    contrast = "".join(map(chr, request.contrast_prompt_ids or ()))
    where = "Why?\n\n" if placement is Placement.END else f"{NEUTRAL_SYSTEM_PROMPT} "
    assert f"{where}{CONCISE}" in contrast
    assert body["preference"]["negative"] == CONCISE and body["preference"]["placement"] == placement.value


def test_classifier_free_guidance_follows_the_servers_placement(
    server: LiveServer, fake: FakeEngine, end: tuple[LiveServer, FakeEngine]
) -> None:
    fields = {"guidance_scale": 1.5, "negative_prompt": "Answer rudely."}
    for (url, engine), placement in (((server, fake), Placement.SYSTEM), (end, Placement.END)):
        body, request = answer(url, engine, **fields)
        assert request.method.method is Method.LA
        assert contexts(request) == expected([], placement, negative="Answer rudely.", method=Method.LA)
        assert body["preference"]["mode"] == "cfg" and body["preference"]["placement"] == placement.value
    assert "Why?\n\nAnswer rudely." in "".join(map(chr, request.contrast_prompt_ids or ()))
    assert common_prefix(*contexts(request)) >= SHARED + len("<|user|>Why?")


def test_pref_and_base_with_the_end_placement(server: LiveServer, fake: FakeEngine) -> None:
    _, request = answer(server, fake, preference={"text": ["concise", "formal"], "method": "pref", "placement": "end"})
    assert contexts(request) == expected(["concise", "formal"], Placement.END, method=Method.PREF)
    _, request = answer(server, fake, preference={"text": "concise", "method": "base", "placement": "end"})
    assert contexts(request) == expected(["concise"], Placement.END, method=Method.BASE)


def test_an_unknown_placement_is_a_400_naming_it(server: LiveServer, fake: FakeEngine) -> None:
    for value in ("middle", "END", 1):
        error = assert_openai_error(chat(server, preference={"text": "concise", "placement": value}), 400)
        assert error["param"] == "preference.placement", error
        assert "'system'" in error["message"] and "'end'" in error["message"], error
    assert fake.requests == []


NO_USER = [{"role": "system", "content": "Be kind."}, {"role": "assistant", "content": "Hello."}]


def test_the_end_placement_without_a_user_message_is_a_400_naming_it(
    server: LiveServer, fake: FakeEngine, end: tuple[LiveServer, FakeEngine]
) -> None:
    error = assert_openai_error(chat(server, NO_USER, preference={"text": "concise", "placement": "end"}), 400)
    assert error["param"] == "preference.placement" and "user message" in error["message"], error
    assert "--preference-placement" not in error["message"]
    end_url, end_fake = end
    error = assert_openai_error(chat(end_url, NO_USER, preference="concise"), 400)
    assert error["param"] == "preference.placement" and "--preference-placement" in error["message"], error
    error = assert_openai_error(chat(end_url, NO_USER, guidance_scale=1.5, negative_prompt="x"), 400)
    assert error["param"] == "preference.placement", error
    assert fake.requests == [] and end_fake.requests == []
    body, _ = answer(end_url, end_fake, messages=NO_USER, preference={"text": "concise", "placement": "system"})
    assert body["preference"]["placement"] == "system"  # the system placement needs no user message


def test_the_option_sets_the_servers_default() -> None:
    # The built-in default is end, chosen by measured effect (README, "Where the preference goes").
    assert parse_args([], environ={}).server.preference_placement is Placement.END is ServerConfig().preference_placement
    assert parse_args(["--preference-placement", "system"], environ={}).server.preference_placement is Placement.SYSTEM
    with pytest.raises(SystemExit):
        parse_args(["--preference-placement", "middle"], environ={})
