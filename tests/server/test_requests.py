"""What the engine is asked for: contexts, method settings and sampling built from an HTTP request."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from amulet_core.engine.protocol import GenerationRequest
from amulet_core.method.preference_prompts import Placement, preference_message_pair
from amulet_core.method.settings import Method, MethodSettings
from server.config import ServerConfig
from tests.support.fake_engine import CACHED_TOKENS, FakeEngine
from tests.support.live_server import LiveServer

MAX_MODEL_LEN = 400
SYSTEM_PROMPT = "You are helpful."
CONVERSATION = [
    {"role": "user", "content": "What is a tide?"},
    {"role": "assistant", "content": "The rise and fall of the sea."},
    {"role": "user", "content": "Why?"},
]


@pytest.fixture(scope="module")
def fake_engine() -> FakeEngine:
    return FakeEngine(max_model_len=MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def server_config() -> ServerConfig:
    # These tests check the system placement's contexts (the end placement's: test_preference_placement.py).
    return ServerConfig(default_system_prompt=SYSTEM_PROMPT, preference_placement=Placement.SYSTEM)


def ask(server: LiveServer, fake: FakeEngine, **body: Any) -> tuple[dict[str, Any], GenerationRequest]:
    response = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": CONVERSATION, **body}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json(), fake.requests[-1]


def test_no_preference_is_plain_decoding_of_the_messages_as_given(server: LiveServer, fake: FakeEngine) -> None:
    answer, request = ask(server, fake)
    assert request.method.method is Method.BASE
    assert request.contrast_prompt_ids is None
    assert request.prompt_ids == fake.encode_chat(CONVERSATION)  # no system prompt added
    assert answer["preference"] is None
    assert answer["usage"]["base_prompt_tokens"] == 0


def test_preset_preference_runs_amulet_with_the_default_settings(server: LiveServer, fake: FakeEngine) -> None:
    answer, request = ask(server, fake, preference="creative")
    pair = preference_message_pair(CONVERSATION, "creative", SYSTEM_PROMPT)
    assert request.method == MethodSettings(method=Method.AMULET, iterations=60, eta=10, alpha=2, lam=2, plausibility=0.5)
    assert request.prompt_ids == fake.encode_chat(pair.pref)
    assert request.contrast_prompt_ids == fake.encode_chat(pair.contrast)
    assert pair.pref[0]["content"] == f"{SYSTEM_PROMPT} Your answer should be creative as much as possible."
    echo = answer["preference"]
    assert echo == {
        "text": "Your answer should be creative as much as possible.",
        "texts": ["Your answer should be creative as much as possible."],
        "weights": [1.0],
        "negative": None,
        "system_prompt": SYSTEM_PROMPT,
        "mode": "default",
        "placement": "system",
        "method": "amulet",
        "iterations": 60,
        "eta": 10.0,
        "alpha": 2.0,
        "lambda": 2.0,
        "ratio": 2.0,
        "plausibility": 0.5,
        "coefficient": pytest.approx(MethodSettings().effective_strength),
    }
    usage = answer["usage"]
    assert usage["prompt_tokens"] == len(request.prompt_ids)
    assert usage["base_prompt_tokens"] == len(request.contrast_prompt_ids)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens_details"] == {"cached_tokens": CACHED_TOKENS}


@pytest.mark.parametrize(
    ("spec", "context", "two"),
    [
        ({"method": "la"}, "pref", True),
        ({"method": "amulet", "iterations": 5, "eta": 3.5, "alpha": 1, "lambda": 0.5, "plausibility": 0.1}, "pref", True),
        ({"method": "pref"}, "pref", False),
        ({"method": "base"}, "contrast", False),
    ],
)
def test_preference_object(server: LiveServer, fake: FakeEngine, spec: dict[str, Any], context: str, two: bool) -> None:
    text = "Answer like a pirate."
    answer, request = ask(server, fake, preference={"text": text, **spec})
    pair = preference_message_pair(CONVERSATION, text, SYSTEM_PROMPT)
    assert request.prompt_ids == fake.encode_chat(getattr(pair, context))
    assert request.contrast_prompt_ids == (fake.encode_chat(pair.contrast) if two else None)
    given = {("lam" if k == "lambda" else k): v for k, v in spec.items()}
    expected = MethodSettings(**given)
    assert request.method == expected
    assert answer["preference"]["text"] == text
    assert answer["preference"]["method"] == spec["method"]
    assert answer["preference"]["coefficient"] == (pytest.approx(expected.effective_strength) if two else None)


def test_la_default_ratio(server: LiveServer, fake: FakeEngine) -> None:
    answer, request = ask(server, fake, preference={"text": "formal", "method": "la"})
    assert request.method.ratio == 2.0
    assert answer["preference"]["coefficient"] == pytest.approx(3.0)


def test_messages_developer_role_and_text_parts(server: LiveServer, fake: FakeEngine) -> None:
    messages = [
        {"role": "developer", "content": "Be kind."},
        {"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]},
    ]
    response = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": messages, "preference": "pleasant"})
    assert response.status_code == 200
    plain = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "one\ntwo"}]
    pair = preference_message_pair(plain, "pleasant", SYSTEM_PROMPT)
    assert fake.requests[-1].prompt_ids == fake.encode_chat(pair.pref)
    assert pair.pref[0]["content"] == "Be kind. Your answer should be pleasant as much as possible."


def test_max_tokens_defaults_to_the_room_left(server: LiveServer, fake: FakeEngine) -> None:
    _, request = ask(server, fake, preference="concise")
    longest = max(len(request.prompt_ids), len(request.contrast_prompt_ids or ()))
    assert request.sampling.max_tokens is None  # the domain's "all the room there is"
    assert request.max_new_tokens(MAX_MODEL_LEN) == MAX_MODEL_LEN - longest
    _, request = ask(server, fake, max_tokens=7, max_completion_tokens=5)
    assert request.sampling.max_tokens == 5  # the newer name wins
    _, request = ask(server, fake, max_tokens=7)
    assert request.sampling.max_tokens == 7


def test_sampling_parameters(server: LiveServer, fake: FakeEngine) -> None:
    _, request = ask(server, fake)
    s = request.sampling
    assert (s.temperature, s.top_p, s.top_k, s.seed, s.stop, s.logprobs) == (1.0, 1.0, 0, None, (), False)
    _, request = ask(
        server, fake, temperature=0, top_p=0.5, top_k=20, seed=7, stop="END", logprobs=True, top_logprobs=3, user="u-1"
    )
    s = request.sampling
    assert (s.temperature, s.top_p, s.top_k, s.seed, s.stop) == (0, 0.5, 20, 7, ("END",))
    assert (s.logprobs, s.top_logprobs) == (True, 3)
    _, request = ask(server, fake, top_k=-1, stop=["a", "b"])
    assert (request.sampling.top_k, request.sampling.stop) == (0, ("a", "b"))


def test_logprobs_are_finite_json(server: LiveServer, fake: FakeEngine) -> None:
    answer, _ = ask(server, fake, logprobs=True, top_logprobs=3)
    content = answer["choices"][0]["logprobs"]["content"]
    first = content[0]
    assert first["bytes"] == list(first["token"].encode("utf-8"))
    assert [t["logprob"] for t in first["top_logprobs"]] == [-0.25, -2.0, -9999.0]  # -inf is clamped
    no_logprobs, _ = ask(server, fake)
    assert no_logprobs["choices"][0]["logprobs"] is None


def test_each_request_gets_its_own_id(server: LiveServer, fake: FakeEngine) -> None:
    first, _ = ask(server, fake)
    second, _ = ask(server, fake)
    assert first["id"] != second["id"]
    assert [r.request_id for r in fake.requests] == [first["id"], second["id"]]
