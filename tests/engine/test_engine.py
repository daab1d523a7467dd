"""The engine against the straightforward loop (full recompute, iterative game), on tiny random models."""

from __future__ import annotations

import random

import pytest

from amulet_core.engine.config import EngineConfig
from amulet_core.engine.llm_engine import LLMEngine
from amulet_core.engine.protocol import GenerationOutput, GenerationRequest
from amulet_core.errors import ContextLengthExceededError
from amulet_core.method.reference import reference_generate
from amulet_core.method.settings import Method, MethodSettings
from amulet_core.sampling.params import SamplingParams
from tests.support.oracle import reference_answer

METHODS = [
    MethodSettings(method=Method.BASE),
    MethodSettings(method=Method.PREF),
    MethodSettings(method=Method.LA, ratio=2.0),
    MethodSettings(method=Method.AMULET),
    MethodSettings(method=Method.AMULET, iterations=20, eta=2, alpha=1, lam=10),
]


def prompts(seed: int, shared: int, pref_extra: int, base_extra: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    rng = random.Random(seed)
    head = [rng.randrange(10, 5000) for _ in range(shared)]
    pref = head + [rng.randrange(10, 5000) for _ in range(pref_extra)]
    base = head + [rng.randrange(10, 5000) for _ in range(base_extra)]
    return tuple(pref), tuple(base)


def make_request(rid: str, settings: MethodSettings, pref, base, max_tokens=16, **sampling) -> GenerationRequest:
    two = settings.method.has_contrast
    primary = base if settings.method is Method.BASE else pref
    params = SamplingParams(max_tokens=max_tokens, temperature=sampling.pop("temperature", 0), **sampling)
    return GenerationRequest(rid, primary, params, settings, base if two else None)


expected = reference_answer


def drain(engine: LLMEngine, max_steps: int = 10_000, on_step=None) -> dict[str, list[GenerationOutput]]:
    outputs: dict[str, list[GenerationOutput]] = {}
    for step in range(max_steps):
        if not engine.has_work():
            return outputs
        if on_step is not None:
            on_step(step)
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    raise AssertionError("engine did not finish")


def tokens_of(outs: list[GenerationOutput]) -> list[int]:
    return [t for o in outs for t in o.token_ids]


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("settings", METHODS, ids=lambda s: f"{s.method.value}-{s.iterations}")
def test_single_request_matches_reference(tiny_model, family, settings):
    loaded = tiny_model(family)
    text = loaded.model.config
    assert text.num_attention_heads > text.num_key_value_heads  # grouped-query attention is what runs
    engine = LLMEngine(loaded, EngineConfig(max_model_len=256, kv_cache_tokens=2048))
    pref, base = prompts(1, shared=20, pref_extra=9, base_extra=3)
    request = make_request("r", settings, pref, base, max_tokens=12)
    engine.add_request(request)
    outs = drain(engine)["r"]
    assert tokens_of(outs) == expected(loaded, request)
    assert outs[-1].finish_reason in ("stop", "length")
    assert outs[-1].usage.prompt_tokens == len(request.prompt_ids)
    assert outs[-1].usage.base_prompt_tokens == (len(base) if request.contrast_prompt_ids else 0)
    assert engine.blocks.num_used == 0


def mixed_requests() -> list[GenerationRequest]:
    """Twelve requests of every method with prompts of 1 to 90 tokens and 6 to 15 new tokens."""
    requests = []
    for i, (settings, sizes) in enumerate(
        zip(METHODS * 2, [(5, 3, 1), (40, 30, 2), (0, 70, 20), (16, 16, 0), (33, 2, 50), (8, 1, 1)] * 2, strict=False)
    ):
        pref, base = prompts(10 + i, *sizes)
        requests.append(make_request(f"r{i}", settings, pref, base, max_tokens=6 + 3 * (i % 4)))
    return requests


def test_mixed_batch_with_chunked_prefill_and_late_joiners_matches_reference(tiny_model):
    loaded = tiny_model("llama")
    engine = LLMEngine(loaded, EngineConfig(max_model_len=512, kv_cache_tokens=4096, max_num_batched_tokens=48))
    requests = mixed_requests()
    first, late = requests[:6], requests[6:]
    for r in first:
        engine.add_request(r)

    def join(step: int) -> None:
        if step == 3:
            for r in late:
                engine.add_request(r)

    outputs = drain(engine, on_step=join)
    for r in requests:
        assert tokens_of(outputs[r.request_id]) == expected(loaded, r), r.request_id
    assert engine.blocks.num_used == 0


def test_prefix_cache_hit_gives_the_same_answer(tiny_model):
    loaded = tiny_model("qwen2")
    engine = LLMEngine(loaded, EngineConfig(max_model_len=256, kv_cache_tokens=2048))
    pref, base = prompts(3, shared=40, pref_extra=7, base_extra=2)
    first = make_request("a", MethodSettings(), pref, base)
    engine.add_request(first)
    a = drain(engine)["a"]
    hits_before = engine.blocks.prefix_hits
    engine.add_request(make_request("b", MethodSettings(), pref, base))
    b = drain(engine)["b"]
    assert engine.blocks.prefix_hits > hits_before
    assert b[-1].usage.cached_prompt_tokens >= 32
    assert tokens_of(a) == tokens_of(b) == expected(loaded, first)


def test_preemption_under_a_small_kv_budget_keeps_answers_exact(tiny_model):
    loaded = tiny_model("llama")
    config = EngineConfig(max_model_len=64, kv_cache_tokens=128, block_size=4, max_num_seqs=8)
    engine = LLMEngine(loaded, config)
    requests = []
    for i in range(4):
        pref, base = prompts(40 + i, shared=12, pref_extra=4, base_extra=1)
        requests.append(make_request(f"p{i}", METHODS[3], pref, base, max_tokens=24, ignore_eos=True))
        engine.add_request(requests[-1])
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
        want = reference_generate(loaded.model, r.prompt_ids, r.contrast_prompt_ids, r.method, 24)
        assert tokens_of(outputs[r.request_id]) == want
    assert engine.blocks.num_used == 0


def test_abort_frees_kv_by_the_next_step(tiny_model):
    loaded = tiny_model("llama")
    engine = LLMEngine(loaded, EngineConfig(max_model_len=256, kv_cache_tokens=2048))
    pref, base = prompts(5, 30, 5, 5)
    engine.add_request(make_request("gone", MethodSettings(), pref, base, max_tokens=100, ignore_eos=True))
    engine.add_request(make_request("stays", MethodSettings(), pref, base[:20], max_tokens=5, ignore_eos=True))
    for _ in range(3):
        engine.step()
    used = engine.blocks.num_used
    assert used > 0
    final = engine.abort("gone")
    assert final.finish_reason == "abort"
    assert engine.blocks.num_used < used
    outputs = drain(engine)
    assert outputs["stays"][-1].finish_reason == "length"
    assert engine.blocks.num_used == 0 and "gone" not in engine.requests


def test_sampling_seeds_top_k_and_stop_conditions(tiny_model):
    loaded = tiny_model("llama")
    engine = LLMEngine(loaded, EngineConfig(max_model_len=256, kv_cache_tokens=4096))
    pref, base = prompts(7, 10, 4, 2)

    def run(rid, **kw):
        engine.add_request(make_request(rid, MethodSettings(), pref, base, max_tokens=kw.pop("max_tokens", 10), **kw))
        return drain(engine)[rid]

    a = tokens_of(run("s1", temperature=1.5, seed=11, ignore_eos=True))
    b = tokens_of(run("s2", temperature=1.5, seed=11, ignore_eos=True))
    assert a == b
    # amulet sharpens the tiny model's distribution, so two seeds can agree on ten tokens (they do in
    # bfloat16): some other seed must differ
    others = [tokens_of(run(f"s{seed}", temperature=1.5, seed=seed, ignore_eos=True)) for seed in range(12, 17)]
    assert any(c != a for c in others)
    greedy = tokens_of(run("g", ignore_eos=True))
    assert tokens_of(run("k1", temperature=1.0, top_k=1, seed=3, ignore_eos=True)) == greedy
    assert tokens_of(run("p0", temperature=1.0, top_p=1e-6, seed=3, ignore_eos=True)) == greedy
    stopped = run("st", stop_token_ids=(greedy[2],), ignore_eos=True)
    assert tokens_of(stopped) == greedy[: greedy.index(greedy[2]) + 1] and stopped[-1].finish_reason == "stop"
    short = run("len", max_tokens=3, ignore_eos=True)
    assert len(tokens_of(short)) == 3 and short[-1].finish_reason == "length"
    lp = run("lp", logprobs=True, top_logprobs=3, ignore_eos=True, max_tokens=4)
    entries = [e for o in lp for e in (o.logprobs or ())]
    assert len(entries) == 4
    for e in entries:
        assert e.logprob <= 0 and len(e.top) == 3 and e.top[0][2] >= e.logprob - 1e-6


def test_prompt_longer_than_context_is_rejected(tiny_model):
    engine = LLMEngine(tiny_model("llama"), EngineConfig(max_model_len=32, kv_cache_tokens=1024))
    pref, base = prompts(9, 40, 1, 1)
    with pytest.raises(ContextLengthExceededError):
        engine.add_request(make_request("x", MethodSettings(), pref, base))


def test_a_failing_request_does_not_take_the_batch_down(tiny_model):
    loaded = tiny_model("llama")
    engine = LLMEngine(loaded, EngineConfig(max_model_len=256, kv_cache_tokens=2048))
    pref, base = prompts(2, 10, 3, 3)
    good = make_request("good", MethodSettings(), pref, base, max_tokens=8)
    engine.add_request(make_request("bad", MethodSettings(), pref, base, max_tokens=8))
    engine.add_request(good)

    def hook(request: GenerationRequest) -> None:
        if request.request_id == "bad":
            raise RuntimeError("injected fault")

    engine.fault_hook = hook
    outputs = drain(engine)
    assert outputs["bad"][-1].finish_reason == "error" and "injected fault" in outputs["bad"][-1].error
    assert tokens_of(outputs["good"]) == expected(loaded, good)
    assert engine.blocks.num_used == 0


def test_kv_cache_dtype_follows_the_model(tiny_model):
    loaded = tiny_model("llama")
    engine = LLMEngine(loaded, EngineConfig(max_model_len=64, kv_cache_tokens=256))
    assert engine.runner.cache.keys[0].dtype == loaded.dtype == next(loaded.model.parameters()).dtype
