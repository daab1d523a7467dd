"""Requests with K = 2 or 3 weighted preference contexts and a contrast context, through the engine, against
the unbatched full-recompute reference (``amulet_core.method.reference``: the game in float64 on the mixture)."""

from __future__ import annotations

import random

import pytest

from amulet_core.engine.config import EngineConfig
from amulet_core.engine.llm_engine import LLMEngine
from amulet_core.engine.protocol import GenerationRequest, Usage
from amulet_core.errors import InvalidParameterError
from amulet_core.method.settings import Method, MethodSettings
from amulet_core.sampling.params import SamplingParams
from tests.engine.test_engine import drain, tokens_of
from tests.support.oracle import reference_answer

MULTI = [
    MethodSettings(method=Method.AMULET, weights=(1.0, 1.0)),
    MethodSettings(method=Method.LA, ratio=2.0, weights=(2.0, 1.0)),
    MethodSettings(method=Method.PREF, weights=(1.0, 3.0)),
    MethodSettings(method=Method.AMULET, iterations=20, eta=2, alpha=1, lam=10, weights=(1.0, 2.0, 4.0), plausibility=0.1),
]
SINGLE = [MethodSettings(method=Method.BASE), MethodSettings(method=Method.AMULET), MethodSettings(method=Method.PREF)]


def contexts(seed: int, shared: int, tails: list[int]) -> list[tuple[int, ...]]:
    """Contexts sharing ``shared`` leading tokens, each with its own tail (the sentence after the system prompt)."""
    rng = random.Random(seed)
    head = [rng.randrange(10, 5000) for _ in range(shared)]
    return [tuple(head + [rng.randrange(10, 5000) for _ in range(n)]) for n in tails]


def make(rid: str, settings: MethodSettings, seed: int, shared: int = 20, max_tokens: int = 10, **sampling) -> GenerationRequest:
    """A request of ``settings`` over contexts of a seed: K preference contexts, then a contrast one if the method has it."""
    k = settings.num_preferences if settings.method is not Method.BASE else 1
    has_contrast = settings.num_contexts > k
    ctx = contexts(seed, shared, [3 + 2 * i for i in range(k)] + ([1] if has_contrast else []))
    params = SamplingParams(max_tokens=max_tokens, temperature=0, **sampling)
    return GenerationRequest(rid, ctx[0], params, settings, ctx[k] if has_contrast else None, tuple(ctx[1:k]))


expected = reference_answer


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("settings", MULTI, ids=lambda s: f"{s.method.value}-k{s.num_preferences}")
def test_single_request_matches_reference(tiny_model, family, settings):
    loaded = tiny_model(family)
    engine = LLMEngine(loaded, EngineConfig(max_model_len=256, kv_cache_tokens=2048))
    request = make("r", settings, seed=1)
    engine.add_request(request)
    outs = drain(engine)["r"]
    assert tokens_of(outs) == expected(loaded, request)
    usage = outs[-1].usage
    assert usage.num_contexts == settings.num_contexts == len(request.contexts)
    assert usage.prompt_tokens == len(request.prompt_ids)
    assert usage.base_prompt_tokens == sum(len(c) for c in request.contexts[1:])
    assert engine.blocks.num_used == 0


def test_the_weights_change_the_answer(tiny_model):
    """Not a vacuous comparison: the second preference context and the weights matter to the tokens."""
    loaded = tiny_model("llama")
    answers = set()
    for weights in ((1.0, 1.0), (1.0, 50.0), (50.0, 1.0)):
        request = make("w", MethodSettings(weights=weights, plausibility=0.0), seed=2, max_tokens=12)
        answers.add(tuple(expected(loaded, request, stop=False)))
    assert len(answers) == 3


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_mixed_batch_with_late_joiners_matches_reference(tiny_model, family):
    """K = 2 and 3 requests mixed with K = 1 and base ones, chunked prefill, requests joining mid-decode."""
    loaded = tiny_model(family)
    engine = LLMEngine(loaded, EngineConfig(max_model_len=512, kv_cache_tokens=4096, max_num_batched_tokens=48))
    kinds = MULTI + SINGLE
    requests = [
        make(f"r{i}", kinds[i % len(kinds)], seed=10 + i, shared=[5, 40, 0, 17][i % 4], max_tokens=5 + 3 * (i % 3))
        for i in range(12)
    ]
    for r in requests[:5]:
        engine.add_request(r)

    def join(step: int) -> None:
        if step in (2, 6):
            for r in requests[5:9] if step == 2 else requests[9:]:
                engine.add_request(r)

    outputs = drain(engine, on_step=join)
    for r in requests:
        assert tokens_of(outputs[r.request_id]) == expected(loaded, r), r.request_id
    assert engine.blocks.num_used == 0


def test_prefix_cache_hit_gives_the_same_answer(tiny_model):
    loaded = tiny_model("qwen2")
    engine = LLMEngine(loaded, EngineConfig(max_model_len=256, kv_cache_tokens=2048))
    first = make("a", MULTI[0], seed=3, shared=40)
    engine.add_request(first)
    a = drain(engine)["a"]
    hits_before = engine.blocks.prefix_hits
    engine.add_request(make("b", MULTI[0], seed=3, shared=40))
    b = drain(engine)["b"]
    assert engine.blocks.prefix_hits >= hits_before + 3  # every one of the three contexts found its blocks
    assert b[-1].usage.cached_prompt_tokens >= 32
    assert tokens_of(a) == tokens_of(b) == expected(loaded, first)


def test_preemption_under_a_small_kv_budget_keeps_answers_exact(tiny_model):
    loaded = tiny_model("llama")
    engine = LLMEngine(loaded, EngineConfig(max_model_len=64, kv_cache_tokens=160, block_size=4, max_num_seqs=12))
    requests = [make(f"p{i}", MULTI[i % 2], seed=40 + i, shared=12, max_tokens=20, ignore_eos=True) for i in range(4)]
    for r in requests:
        engine.add_request(r)
    preempted = []
    original = engine.scheduler.schedule

    def spy():
        plan = original()
        preempted.extend(plan.preempted)
        return plan

    engine.scheduler.schedule = spy
    outputs = drain(engine)
    assert preempted, "the budget was meant to force preemption"
    for r in requests:
        assert tokens_of(outputs[r.request_id]) == expected(loaded, r, stop=False), r.request_id
    assert engine.blocks.num_used == 0


def test_contexts_share_their_common_leading_blocks(tiny_model):
    """Three contexts with 32 common tokens (two 16-token blocks): those blocks are held once."""
    engine = LLMEngine(tiny_model("llama"), EngineConfig(max_model_len=256, kv_cache_tokens=2048))
    request = make("s", MULTI[0], seed=4, shared=32, max_tokens=4, ignore_eos=True)
    engine.add_request(request)
    engine.step()
    seqs = engine.requests["s"].group.seqs
    assert len(seqs) == 3
    assert seqs[1].block_table[:2] == seqs[2].block_table[:2] == seqs[0].block_table[:2]
    assert len({b for s in seqs for b in s.block_table}) == sum(len(s.block_table) for s in seqs) - 4
    drain(engine)
    assert engine.blocks.num_used == 0


def test_abort_frees_every_contexts_blocks(tiny_model):
    engine = LLMEngine(tiny_model("llama"), EngineConfig(max_model_len=256, kv_cache_tokens=2048))
    gone = make("gone", MULTI[3], seed=5, shared=30, max_tokens=100, ignore_eos=True)  # four sequences
    engine.add_request(gone)
    engine.add_request(make("stays", MULTI[0], seed=6, shared=10, max_tokens=5, ignore_eos=True))
    for _ in range(3):
        engine.step()
    seqs = engine.requests["gone"].group.seqs
    assert len(seqs) == 4 and all(s.block_table for s in seqs)
    used = engine.blocks.num_used
    final = engine.abort("gone")
    assert final.finish_reason == "abort" and final.usage.num_contexts == 4
    assert engine.blocks.num_used < used and not any(s.block_table for s in seqs)
    outputs = drain(engine)
    assert outputs["stays"][-1].finish_reason == "length"
    assert engine.blocks.num_used == 0 and not engine.requests


def test_requests_name_the_preference_when_the_contexts_do_not_match():
    two = MethodSettings(weights=(1.0, 2.0))
    with pytest.raises(InvalidParameterError) as info:
        GenerationRequest("x", (1, 2), method=two, contrast_prompt_ids=(1, 3))  # one preference context short
    assert info.value.param == "preference"
    with pytest.raises(InvalidParameterError) as info:
        GenerationRequest("x", (1, 2), method=MethodSettings(), contrast_prompt_ids=(1, 3), extra_prompt_ids=((4,),))
    assert info.value.param == "preference"
    with pytest.raises(InvalidParameterError) as info:
        GenerationRequest("x", (1, 2), method=MethodSettings(method=Method.BASE), extra_prompt_ids=((4,),))
    assert info.value.param == "preference"
    with pytest.raises(InvalidParameterError) as info:
        GenerationRequest("x", (1, 2), method=two, contrast_prompt_ids=(1, 3), extra_prompt_ids=((),))
    assert info.value.param == "preference"
    ok = GenerationRequest("x", (1, 2), method=two, contrast_prompt_ids=(1, 3, 5, 7), extra_prompt_ids=[[4, 5, 6]])  # type: ignore[arg-type]
    assert ok.contexts == [(1, 2), (4, 5, 6), (1, 3, 5, 7)] and ok.max_new_tokens(16) == 12
    base = GenerationRequest("y", (1, 2), method=MethodSettings(method=Method.BASE, weights=(1.0, 2.0)))
    assert base.contexts == [(1, 2)]


def test_too_many_contexts_for_the_engine_are_refused(tiny_model):
    engine = LLMEngine(tiny_model("llama"), EngineConfig(max_model_len=64, kv_cache_tokens=256, max_num_seqs=4))
    request = make("big", MethodSettings(weights=(1.0,) * 4), seed=7)  # five sequences
    with pytest.raises(InvalidParameterError) as info:
        engine.add_request(request)
    assert info.value.param == "preference" and not engine.requests


def test_usage_of_choices_keeps_the_context_count():
    usages = [Usage(10, 3, base_prompt_tokens=25, cached_prompt_tokens=4, num_contexts=3), Usage(10, 5, 25, 0, 3)]
    total = Usage.of_choices(usages)
    assert (total.completion_tokens, total.base_prompt_tokens, total.num_contexts) == (8, 25, 3)
