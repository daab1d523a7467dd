"""Several preferences, a negative context and classifier-free guidance through HTTP (fake engine): the
contexts handed to the engine, the settings, the echo, usage, and every bad value as a 400."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from amulet_core.method.preference_prompts import NEUTRAL_SYSTEM_PROMPT, Placement
from amulet_core.method.settings import Method
from server.config import ServerConfig
from tests.support.fake_engine import FakeEngine
from tests.support.http import USER, assert_openai_error
from tests.support.live_server import LiveServer


@pytest.fixture(scope="module")
def server_config() -> ServerConfig:
    """These tests check the contexts of the system placement (the end placement's are in test_preference_placement.py)."""
    return ServerConfig(preference_placement=Placement.SYSTEM)


CONCISE = "Your answer should be concise as much as possible."
FORMAL = "Your answer should be formal as much as possible."
VERBOSE = "Your answer should be verbose as much as possible."


def chat(server: LiveServer, **fields: Any) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/chat/completions", json={"messages": USER, **fields})


def text(ids: tuple[int, ...] | None) -> str:
    return "".join(chr(i) for i in ids or ())


def system_of(ids: tuple[int, ...] | None) -> str:
    """The sentences a context's system message carries after the server's default (the fake template has none,
    so conversations without a system message get the neutral one)."""
    system = text(ids).split("<|system|>", 1)[1].split("\n", 1)[0]
    return system.removeprefix(NEUTRAL_SYSTEM_PROMPT).strip()


def test_a_list_of_preferences_decodes_one_context_each_plus_the_contrast(server: LiveServer, fake: FakeEngine) -> None:
    body = chat(server, preference=["concise", "formal"]).json()
    request = fake.requests[-1]
    assert request.method.method is Method.AMULET and request.method.normalized_weights == (0.5, 0.5)
    assert [system_of(request.prompt_ids), system_of(request.extra_prompt_ids[0]), system_of(request.contrast_prompt_ids)] == [
        CONCISE,
        FORMAL,
        "",
    ]
    echo = body["preference"]
    assert (echo["text"], echo["texts"], echo["weights"], echo["negative"]) == (CONCISE, [CONCISE, FORMAL], [0.5, 0.5], None)
    extra = len(request.extra_prompt_ids[0]) + len(request.contrast_prompt_ids or ())
    assert body["usage"]["base_prompt_tokens"] == extra  # every context besides the decoded one


def test_weights_and_a_negative_preference(server: LiveServer, fake: FakeEngine) -> None:
    body = chat(server, preference={"text": [{"text": "verbose", "weight": 3}, "formal"], "negative": "concise"}).json()
    request = fake.requests[-1]
    assert request.method.normalized_weights == (0.75, 0.25)
    assert system_of(request.contrast_prompt_ids) == CONCISE  # the contrast carries the negative preference
    assert body["preference"]["negative"] == CONCISE and body["preference"]["weights"] == [0.75, 0.25]
    chat(server, preference={"text": ["verbose", "formal"], "weights": [1, 3], "method": "la"})
    request = fake.requests[-1]
    assert (request.method.method, request.method.normalized_weights) == (Method.LA, (0.25, 0.75))


def test_pref_with_several_preferences_has_no_contrast(server: LiveServer, fake: FakeEngine) -> None:
    chat(server, preference={"text": ["concise", "formal"], "method": "pref"})
    request = fake.requests[-1]
    assert request.contrast_prompt_ids is None and len(request.extra_prompt_ids) == 1


def test_one_preference_is_unchanged(server: LiveServer, fake: FakeEngine) -> None:
    for preference in ("concise", ["concise"], {"text": "concise"}, {"text": ["concise"]}):
        chat(server, preference=preference)
        request = fake.requests[-1]
        assert request.extra_prompt_ids == () and request.method.weights == ()
        assert system_of(request.prompt_ids) == CONCISE and system_of(request.contrast_prompt_ids) == ""


def test_classifier_free_guidance(server: LiveServer, fake: FakeEngine) -> None:
    body = chat(server, guidance_scale=1.5, negative_prompt="Answer rudely.").json()
    request = fake.requests[-1]
    assert system_of(request.prompt_ids) == "" and system_of(request.contrast_prompt_ids) == "Answer rudely."
    assert request.method.method is Method.LA and request.method.effective_strength == 1.5 and request.method.plausibility == 0
    echo = body["preference"]
    assert (echo["mode"], echo["coefficient"], echo["texts"], echo["negative"]) == ("cfg", 1.5, [], "Answer rudely.")


BAD: list[tuple[dict[str, Any], str]] = [
    ({"preference": []}, "preference"),
    ({"preference": ["a", "b", "c", "d", "e"]}, "preference"),
    ({"preference": [{"text": "a", "weight": 0}]}, "preference[0].weight"),
    ({"preference": [{"text": "a", "weight": -1}]}, "preference[0].weight"),
    ({"preference": [{"text": "a", "weight": "high"}]}, "preference[0].weight"),
    ({"preference": {"text": ["a", "b"], "weights": [1]}}, "preference.weights"),
    ({"preference": {"text": ["a", "b"], "weights": [1, 0]}}, "preference.weights[1]"),
    ({"preference": {"text": "a", "weights": [1]}}, "preference.weights"),
    ({"preference": {"text": "a", "coefficient": 3, "iterations": 10}}, "preference.coefficient"),
    ({"preference": {"text": "a", "method": "pref", "negative": "b"}}, "preference.negative"),
    ({"preference": "concise", "guidance_scale": 1.5, "negative_prompt": "x"}, "guidance_scale"),
    ({"guidance_scale": -0.5, "negative_prompt": "x"}, "guidance_scale"),
    ({"guidance_scale": 1.5}, "negative_prompt"),
    ({"negative_prompt": "x"}, "guidance_scale"),
]


@pytest.mark.parametrize(("fields", "param"), BAD, ids=[str(f)[:60] for f, _ in BAD])
def test_bad_values_are_400_naming_the_field(server: LiveServer, fake: FakeEngine, fields: dict[str, Any], param: str) -> None:
    error = assert_openai_error(chat(server, **fields), 400)
    assert error["param"] == param, error
    assert fake.requests == []
    assert chat(server, preference=["concise", "formal"]).status_code == 200


def test_nan_weight_is_400(server: LiveServer) -> None:
    body = b'{"messages": [{"role": "user", "content": "Hi"}], "preference": [{"text": "a", "weight": NaN}]}'
    response = httpx.post(f"{server.url}/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert assert_openai_error(response, 400)["param"] == "preference[0].weight"


def test_guidance_is_refused_by_text_completions(server: LiveServer) -> None:
    response = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", "guidance_scale": 2, "negative_prompt": "y"})
    assert assert_openai_error(response, 400)["param"] == "guidance_scale"
