"""On the embedded SmolLM2-135M-Instruct (float32): the engine against transformers and the paper's loop."""

from __future__ import annotations

import pytest
import torch

from amulet_core.engine.config import EngineConfig
from amulet_core.engine.llm_engine import LLMEngine
from amulet_core.engine.protocol import GenerationRequest
from amulet_core.method.preference_prompts import PAPER_SYSTEM_PROMPT, preference_message_pair
from amulet_core.method.reference import reference_generate
from amulet_core.method.settings import Method, MethodSettings
from amulet_core.model.chat_template import render_chat
from amulet_core.sampling.params import SamplingParams

pytestmark = pytest.mark.smollm

QUESTIONS = [
    "How do I make a cup of green tea?",
    "Explain why the sky is blue.",
    "Give me three tips for a job interview.",
]


@pytest.fixture(scope="module")
def engine(smollm) -> LLMEngine:
    return LLMEngine(smollm, EngineConfig(max_model_len=1024, kv_cache_tokens=8192))


def contexts(tokenizer, question: str, preference: str = "concise") -> tuple[tuple[int, ...], tuple[int, ...]]:
    messages = [{"role": "system", "content": PAPER_SYSTEM_PROMPT}, {"role": "user", "content": question}]
    pair = preference_message_pair(messages, preference)
    return tuple(render_chat(tokenizer, pair.pref)), tuple(render_chat(tokenizer, pair.contrast))


def run(engine: LLMEngine, request: GenerationRequest) -> list[int]:
    engine.add_request(request)
    tokens: list[int] = []
    while engine.has_work():
        for out in engine.step():
            tokens.extend(out.token_ids)
    return tokens


def test_base_decoding_equals_transformers_generate(smollm, engine):
    tok = smollm.tokenizer
    prompt = tuple(render_chat(tok, [{"role": "user", "content": QUESTIONS[0]}]))
    with torch.inference_mode():
        generated = smollm.model.generate(
            torch.tensor([prompt]), max_new_tokens=64, do_sample=False, pad_token_id=tok.eos_token_id
        )
    want = generated[0, len(prompt) :].tolist()
    request = GenerationRequest("base", prompt, SamplingParams(max_tokens=64, temperature=0), MethodSettings(method=Method.BASE))
    assert run(engine, request) == want


@pytest.mark.parametrize(("question", "kv_cache"), [(QUESTIONS[0], False), (QUESTIONS[1], True), (QUESTIONS[2], True)])
def test_paper_mode_amulet_equals_the_iterative_algorithm_1(smollm, engine, question, kv_cache):
    """Paper mode (A from T=60, eta=10, alpha=2, lambda=2; no mask) is Algorithm 1 token for token: against
    the loop with a full forward pass per token (no cache at all: 24 tokens, each a forward pass over the whole
    of both contexts, about half the time 40 took), and, faster, with transformers' KV cache (40 tokens)."""
    pref, base = contexts(smollm.tokenizer, question)
    settings = MethodSettings.paper()
    assert settings.plausibility == 0
    new_tokens = 40 if kv_cache else 24
    request = GenerationRequest("amulet", pref, SamplingParams(max_tokens=new_tokens, temperature=0), settings, base)
    want = reference_generate(smollm.model, pref, base, settings, new_tokens, stop_ids=smollm.eos_token_ids, kv_cache=kv_cache)
    got = run(engine, request)
    assert got == want
    assert len(got) >= 16


@pytest.mark.parametrize("method", [Method.BASE, Method.PREF, Method.LA])
def test_other_methods_equal_the_paper_loop(smollm, engine, method):
    pref, base = contexts(smollm.tokenizer, QUESTIONS[1], "verbose")
    settings = MethodSettings(method=method)
    primary = base if method is Method.BASE else pref
    second = base if method is Method.LA else None
    request = GenerationRequest(f"m-{method.value}", primary, SamplingParams(max_tokens=32, temperature=0), settings, second)
    want = reference_generate(smollm.model, primary, second, settings, 32, stop_ids=smollm.eos_token_ids, kv_cache=True)
    assert run(engine, request) == want


def test_preference_changes_the_answer(smollm, engine):
    pref, base = contexts(smollm.tokenizer, QUESTIONS[2])
    sp = SamplingParams(max_tokens=48, temperature=0)
    plain = run(engine, GenerationRequest("p", base, sp, MethodSettings(method=Method.BASE)))
    amulet = run(engine, GenerationRequest("a", pref, sp, MethodSettings(), base))
    assert plain != amulet


def test_default_mode_amulet_equals_the_iterative_loop_with_the_mask(smollm, engine):
    """The default settings are Algorithm 1 followed by the plausibility mask, token for token."""
    pref, base = contexts(smollm.tokenizer, QUESTIONS[0])
    settings = MethodSettings()
    assert settings.plausibility > 0 and settings.effective_strength == MethodSettings.paper().effective_strength
    request = GenerationRequest("default", pref, SamplingParams(max_tokens=32, temperature=0), settings, base)
    want = reference_generate(smollm.model, pref, base, settings, 32, stop_ids=smollm.eos_token_ids, kv_cache=True)
    assert run(engine, request) == want
