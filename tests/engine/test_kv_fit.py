"""A request the KV cache can never hold is refused at once with its numbers, instead of waiting at the head of
the queue for ever; the context follows the engine's sizing into the server; and with the defaults a 4,000-token
conversation fits and one past 2,048 tokens is served (the embedded SmolLM2: its own context is 8,192 tokens)."""

from __future__ import annotations

import asyncio
import random

import httpx
import pytest
import torch

from amulet_core.engine.async_engine import AsyncEngine
from amulet_core.engine.config import EngineConfig
from amulet_core.engine.llm_engine import LLMEngine
from amulet_core.engine.protocol import GenerationOutput, GenerationRequest
from amulet_core.errors import ContextLengthExceededError
from amulet_core.method.settings import Method, MethodSettings
from amulet_core.model.loading import ModelConfig
from amulet_core.sampling.params import SamplingParams
from tests.support.http import assert_openai_error
from tests.support.live_server import engine_server

SMALL = EngineConfig(max_model_len=256, kv_cache_tokens=512, max_num_seqs=8)
"""32 blocks of 16: one two-context request of 256 tokens a context, no more."""


def request(rid: str, k: int, prompt: int, max_tokens: int | None, seed: int = 0) -> GenerationRequest:
    """An amulet request of ``k`` preferences (``k + 1`` contexts) of ``prompt`` tokens, all different from the
    second token on (nothing shared), or a base request when ``k`` is 0."""
    rng = random.Random(seed)
    contexts = [tuple([1] + [rng.randrange(10, 5000) for _ in range(prompt - 1)]) for _ in range(max(1, k + 1))]
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    if k == 0:
        return GenerationRequest(rid, contexts[0], params, MethodSettings(method=Method.BASE))
    settings = MethodSettings(method=Method.AMULET, weights=(1.0,) * k)
    return GenerationRequest.from_contexts(rid, contexts, params, settings)


def drain(engine: LLMEngine) -> dict[str, list[GenerationOutput]]:
    outputs: dict[str, list[GenerationOutput]] = {}
    for _ in range(2000):
        if not engine.has_work():
            return outputs
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    raise AssertionError("the engine did not finish")


def test_a_request_that_can_never_fit_is_refused_while_one_that_fits_runs(tiny_model) -> None:
    engine = LLMEngine(tiny_model("llama"), SMALL)
    assert (engine.blocks.num_blocks, engine.max_model_len) == (32, 256)
    engine.add_request(request("fits", k=1, prompt=100, max_tokens=150))  # 2 x 16 blocks at its longest
    first = engine.step()
    # Three contexts of 100 tokens and 150 new ones: 3 x 16 blocks at their longest, the cache has 32.
    with pytest.raises(ContextLengthExceededError) as refused:
        engine.add_request(request("never", k=2, prompt=100, max_tokens=150))
    error = refused.value
    assert error.param == "max_tokens" and error.code == "context_length_exceeded"
    assert "3 contexts need 48 KV blocks of 16 tokens (768 tokens" in error.message
    assert "holds 32 blocks (512 tokens)" in error.message and "Lower 'max_tokens' to 61 or less" in error.message
    assert "never" not in engine.requests and len(engine.scheduler.waiting) == 0
    outs = drain(engine)
    assert set(outs) == {"fits"} and sum(len(o.token_ids) for o in first + outs["fits"]) == 150
    # With 61 new tokens it fits, and runs.
    engine.add_request(request("lowered", k=2, prompt=100, max_tokens=61))
    assert sum(len(o.token_ids) for o in drain(engine)["lowered"]) == 61


def test_prompts_too_big_for_the_cache_name_the_messages(tiny_model) -> None:
    # Five contexts of 120 tokens: 5 x 8 blocks before the first new token, the cache has 32.
    engine = LLMEngine(tiny_model("llama"), SMALL)
    with pytest.raises(ContextLengthExceededError) as refused:
        engine.validate(request("x", k=4, prompt=120, max_tokens=4))
    assert refused.value.param == "messages"
    assert "5 contexts need 40 KV blocks of 16 tokens (640 tokens" in refused.value.message
    assert "for the messages alone" in refused.value.message and "Shorten the messages" in refused.value.message


def test_without_max_tokens_a_request_gets_what_fits(tiny_model) -> None:
    engine = LLMEngine(tiny_model("llama"), SMALL)
    plain = request("room", k=1, prompt=100, max_tokens=None)
    assert engine.validate(plain) == 156  # all the context leaves: two contexts always fit
    three = request("fitted", k=2, prompt=100, max_tokens=None)
    assert engine.validate(three) == 61  # not 156: the cache holds three contexts of 160 tokens, no more
    engine.add_request(three)
    outs = drain(engine)["fitted"]
    assert sum(len(o.token_ids) for o in outs) == 61 and outs[-1].finish_reason == "length"


def test_the_async_engine_refuses_before_queueing(tiny_model) -> None:
    loaded = tiny_model("llama")
    threads = ModelConfig(cpu_threads=torch.get_num_threads())
    eng = AsyncEngine(threads, SMALL, loader=lambda _: loaded).start()
    eng.wait_ready(60)
    assert eng.max_model_len == 256

    async def go() -> list[GenerationOutput]:
        stream = eng.generate(request("fits", k=1, prompt=100, max_tokens=40))
        first = await anext(stream)
        with pytest.raises(ContextLengthExceededError):
            async for _ in eng.generate(request("never", k=2, prompt=100, max_tokens=150)):
                pass
        assert eng.stats().waiting_requests == 0
        return [first] + [o async for o in stream]

    try:
        outs = asyncio.run(go())
    finally:
        eng.close()
    assert sum(len(o.token_ids) for o in outs) == 40 and outs[-1].finish_reason == "length"


def test_the_server_answers_400_with_the_numbers(tiny_model) -> None:
    with engine_server(tiny_model("llama"), SMALL) as running:
        # About 60 tokens a context and 190 new ones: 3 x 14 blocks at their longest, less at most 3 shared leading
        # blocks twice over (whichever placement the preference has), against the cache's 32.
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 190, "preference": {"text": ["concise", "formal"]}}
        response = httpx.post(f"{running.url}/v1/chat/completions", json=body, timeout=60)
        error = assert_openai_error(response, 400)
        assert error["param"] == "max_tokens" and error["code"] == "context_length_exceeded"
        assert "3 contexts need" in error["message"] and "the KV cache holds 32 blocks (512 tokens)" in error["message"]
        fits = {**body, "max_tokens": 4, "preference": "concise"}
        answer = httpx.post(f"{running.url}/v1/chat/completions", json=fits, timeout=60)
        assert answer.status_code == 200, answer.text
        assert httpx.get(f"{running.url}/v1/models").json()["data"][0]["max_model_len"] == 256


def word_conversation(words: list[str]) -> list[dict[str, str]]:
    """A three-message conversation of ``words`` (split between the two user messages), one token a word or so."""
    half = len(words) // 2
    return [
        {"role": "user", "content": " ".join(words[:half])},
        {"role": "assistant", "content": "I see a list of words."},
        {"role": "user", "content": " ".join(words[half:]) + " Which word comes first?"},
    ]


def test_a_4000_token_conversation_is_served_with_the_defaults(smollm) -> None:
    """The defaults size the context to the model's 8,192 tokens. A 4,000-token conversation fits: over HTTP, asking
    for one token more than the context leaves is refused naming ``max_tokens``, not the messages, and the engine's
    own check (``validate``, which the server runs before queueing) leaves it the rest of the context to answer in.
    One of about 2,300 tokens, past the 2,048 of the fallback context, is prefilled in several chunks and answered
    over HTTP. (Answering the 4,000-token one took 80 s of the suite on the CPU, where the batch-invariant
    attention of the last chunks grows with the context; the shorter one takes about 40% of that.)"""
    # The defaults but max_num_seqs: the cache stops at what 2 sequences of the model's context use (0.7 GiB in
    # float32) instead of taking its 2 GiB in the test process.
    with engine_server(smollm, EngineConfig(max_num_seqs=2)) as running:
        engine = running.engine.engine
        assert engine.max_model_len == 8192  # the model's own context: the cache holds a two-context request of it
        assert engine.blocks.num_blocks == 2 * (8192 // 16 + 1)
        assert httpx.get(f"{running.url}/v1/models").json()["data"][0]["max_model_len"] == 8192
        rng = random.Random(0)
        words = [rng.choice(["apple", "river", "stone", "cloud", "music", "garden", "window", "paper"]) for _ in range(3900)]
        long = httpx.post(f"{running.url}/tokenize", json={"messages": word_conversation(words)}, timeout=60).json()
        assert 3800 < long["count"] < 4400 and long["max_model_len"] == 8192
        too_long = {"messages": word_conversation(words), "max_tokens": 8192 - long["count"] + 1}
        error = assert_openai_error(httpx.post(f"{running.url}/v1/chat/completions", json=too_long, timeout=60), 400)
        assert (error["param"], error["code"]) == ("max_tokens", "context_length_exceeded"), error
        params = SamplingParams(max_tokens=None, temperature=0)
        long_request = GenerationRequest("long", tuple(long["tokens"]), params, MethodSettings(method=Method.BASE))
        assert engine.validate(long_request) == 8192 - long["count"]  # fits, with the rest of the context to answer in
        messages = word_conversation(words[:2250])
        tokens = httpx.post(f"{running.url}/tokenize", json={"messages": messages}, timeout=60).json()
        assert 2048 + 128 < tokens["count"] < 2600  # past the fallback context by more than a KV block or a key block
        body = {"messages": messages, "max_tokens": 3, "temperature": 0}
        response = httpx.post(f"{running.url}/v1/chat/completions", json=body, timeout=600)
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["usage"]["prompt_tokens"] == tokens["count"] and answer["usage"]["completion_tokens"] >= 1


def test_the_models_endpoint_reports_no_max_model_len_while_the_model_loads(tiny_model) -> None:
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.config import ServerConfig

    engine = AsyncEngine(loader=lambda _: tiny_model("llama"))  # never started: loading for ever
    from tests.support.http import IN_PROCESS_HOST

    with TestClient(create_app(engine, ServerConfig(allowed_hosts=(IN_PROCESS_HOST,)))) as client:
        assert client.get("/v1/models").json()["data"][0]["max_model_len"] is None
        assert client.get("/v1/models/SmolLM2-135M-Instruct").json()["max_model_len"] is None


@pytest.mark.parametrize("longest", [48, 200])
def test_the_warm_up_pass_that_measures_a_gpus_activations_runs(tiny_model, longest: int) -> None:
    """On the CPU here: a chunk ending a longer context (200), or whole contexts side by side (48)."""
    engine = LLMEngine(tiny_model("llama"), SMALL)
    engine.runner.warm_up(num_tokens=128, longest=longest, logits_rows=8)
    engine.add_request(request("after", k=1, prompt=20, max_tokens=3))  # the engine's own cache is untouched
    assert sum(len(o.token_ids) for o in drain(engine)["after"]) == 3
