"""Real clients (the official ``openai`` SDK, ``langchain-openai``) against a real uvicorn over the real
engine, on a tiny random-weight Llama with SmolLM2's tokenizer (fast, and greedy answers are exact).

What a drop-in server must do for them: tolerate the fields they send, sample with the fields they
set (``n``, penalties, ``logit_bias``, vLLM's ``extra_body``), and serve ``/v1/completions``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
from langchain_openai import ChatOpenAI, OpenAI

from amulet_core.engine.config import EngineConfig
from amulet_core.model.loading import LoadedModel
from tests.support.live_server import EngineServer, engine_server

MESSAGES: list[Any] = [{"role": "user", "content": "Name three colours."}]
TOKENS = 6


@pytest.fixture(scope="module")
def running(tiny_model: Callable[[str], LoadedModel]) -> Iterator[EngineServer]:
    config = EngineConfig(max_model_len=256, max_num_seqs=16, kv_cache_tokens=4096)
    with engine_server(tiny_model("llama"), config) as server:
        yield server


@pytest.fixture(scope="module")
def model(running: EngineServer) -> str:
    return str(httpx.get(f"{running.url}/v1/models").json()["data"][0]["id"])


@pytest.fixture(scope="module")
def client(running: EngineServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0, timeout=300) as c:
        yield c


def greedy(client: openai.OpenAI, model: str, **fields: Any) -> str:
    response = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=TOKENS, temperature=0, **fields)
    return response.choices[0].message.content or ""


def first_token_id(running: EngineServer, text: str) -> int:
    return int(httpx.post(f"{running.url}/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"][0])


def test_unknown_and_no_effect_fields_change_nothing(client: openai.OpenAI, model: str) -> None:
    plain = greedy(client, model)
    assert plain
    exported = greedy(
        client,
        model,
        store=False,
        metadata={"app": "test"},
        service_tier="auto",
        user="u-1",
        response_format={"type": "text"},
        extra_body={"some_gateway_field": {"trace": 1}, "safety_identifier": "h", "prompt_cache_key": "k"},
    )
    assert exported == plain


def test_logit_bias_bans_and_forces_tokens(running: EngineServer, client: openai.OpenAI, model: str) -> None:
    plain = greedy(client, model)
    banned = first_token_id(running, plain)
    assert greedy(client, model, logit_bias={str(banned): -100}) != plain
    forced_id = first_token_id(running, " banana")
    forced_text = httpx.post(f"{running.url}/detokenize", json={"tokens": [forced_id]}).json()["prompt"]
    forced = greedy(client, model, logit_bias={str(forced_id): 100})
    assert forced.startswith(forced_text) and forced != plain


def test_n_choices_are_reproducible_per_seed(client: openai.OpenAI, model: str) -> None:
    def sample() -> list[str]:
        response = client.chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=TOKENS, temperature=1.0, n=3, seed=11
        )
        assert [c.index for c in response.choices] == [0, 1, 2]
        assert response.usage is not None and response.usage.completion_tokens == 3 * TOKENS
        return [c.message.content or "" for c in response.choices]

    first = sample()
    assert sample() == first
    assert len(set(first)) > 1  # each choice draws from its own generator
    # Choice j samples with seed + j, the same as a request of its own with that seed.
    alone = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=TOKENS, temperature=1.0, seed=12)
    assert alone.choices[0].message.content == first[1]


def test_penalties_and_vllm_fields(running: EngineServer, client: openai.OpenAI, model: str) -> None:
    plain = greedy(client, model)
    ids = httpx.post(f"{running.url}/tokenize", json={"prompt": plain, "add_special_tokens": False}).json()["tokens"]
    assert len(set(ids)) < len(ids)  # the tiny model's greedy answer repeats a token ...
    assert greedy(client, model, presence_penalty=2.0, frequency_penalty=2.0) != plain  # ... which penalties prevent
    vllm = greedy(client, model, extra_body={"repetition_penalty": 1.0, "min_p": 0.0, "top_k": -1, "ignore_eos": True})
    assert vllm == plain  # neutral values change nothing
    longer = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=12, temperature=0, extra_body={"min_tokens": 12, "ignore_eos": True}
    )
    assert longer.usage is not None and longer.usage.completion_tokens == 12


def test_text_completions_streamed_and_not(client: openai.OpenAI, model: str) -> None:
    whole = client.completions.create(model=model, prompt="The sky is", max_tokens=TOKENS, temperature=0)
    text = whole.choices[0].text
    assert text and whole.usage is not None and whole.usage.completion_tokens == TOKENS
    stream = client.completions.create(model=model, prompt="The sky is", max_tokens=TOKENS, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == text
    echoed = client.completions.create(model=model, prompt="The sky is", max_tokens=TOKENS, temperature=0, echo=True)
    assert echoed.choices[0].text == "The sky is" + text


def test_langchain_chat_model(running: EngineServer, client: openai.OpenAI, model: str) -> None:
    want = greedy(client, model)
    llm = ChatOpenAI(base_url=f"{running.url}/v1", api_key="unused", model=model, temperature=0, max_tokens=TOKENS)  # type: ignore[arg-type]
    assert llm.invoke(MESSAGES[0]["content"]).content == want
    assert "".join(str(chunk.content) for chunk in llm.stream(MESSAGES[0]["content"])) == want
    assert [m.content for m in llm.batch([MESSAGES[0]["content"]] * 3)] == [want] * 3


def test_langchain_completion_model(running: EngineServer, client: openai.OpenAI, model: str) -> None:
    want = client.completions.create(model=model, prompt="The sky is", max_tokens=TOKENS, temperature=0).choices[0].text
    llm = OpenAI(base_url=f"{running.url}/v1", api_key="unused", model=model, temperature=0, max_tokens=TOKENS)  # type: ignore[arg-type]
    assert llm.invoke("The sky is") == want


def test_several_preferences_and_guidance(running: EngineServer, client: openai.OpenAI, model: str) -> None:
    one = greedy(client, model, extra_body={"preference": "concise"})
    assert greedy(client, model, extra_body={"preference": ["concise"]}) == one  # a list of one is the same request
    two = client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        max_tokens=TOKENS,
        temperature=0,
        extra_body={"preference": {"text": ["concise", "formal"], "weights": [3, 1], "negative": "verbose"}},
    )
    echo = (two.model_extra or {})["preference"]
    assert echo["weights"] == [0.75, 0.25] and echo["negative"].startswith("Your answer should be verbose")
    assert two.usage is not None and (two.usage.model_extra or {})["base_prompt_tokens"] > two.usage.prompt_tokens
    # Guidance with g = 1 is plain decoding: the preference context is the conversation as given.
    assert greedy(client, model, extra_body={"guidance_scale": 1.0, "negative_prompt": "Be rude."}) == greedy(client, model)
    assert greedy(client, model, extra_body={"guidance_scale": 3.0, "negative_prompt": "Be rude."}) != greedy(client, model)
