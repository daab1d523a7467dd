"""The engine's OpenAI/vLLM sampling set on a tiny random-weight model: penalties, logit_bias, min_tokens,
stop ids and ignore_eos, against a full-recompute loop that applies the per-row sampler's processors."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from amulet_core.engine.config import EngineConfig
from amulet_core.engine.llm_engine import LLMEngine
from amulet_core.engine.protocol import GenerationRequest
from amulet_core.errors import InvalidParameterError
from amulet_core.method.reference import next_token_logprobs
from amulet_core.method.settings import Method, MethodSettings
from amulet_core.sampling.processors import RowHistory
from amulet_core.sampling.sampler import choose_token
from tests.engine.test_engine import drain, make_request, prompts, tokens_of
from tests.support.step_spy import spy_passes

EOS = 2  # the tiny models' EOS id
FAVOURED = ((100, 30.0), (200, 30.0), (300, 30.0), (400, 30.0))
"""A large bias on four tokens: greedy decoding then mostly repeats one of them, which the penalties act on."""
BASE = MethodSettings(method=Method.BASE)
MIX = dict(
    logit_bias=FAVOURED + ((EOS, 25.0),),
    presence_penalty=0.5,
    frequency_penalty=1.5,
    repetition_penalty=1.2,
    min_tokens=4,
    stop_token_ids=(300,),
)


@pytest.fixture
def engine(tiny_model):
    return LLMEngine(tiny_model("llama"), EngineConfig(max_model_len=256, kv_cache_tokens=8192))


def reference_tokens(loaded, request: GenerationRequest) -> list[int]:
    """Greedy full-recompute decoding with ``choose_token``'s processors (the engine's stop rules)."""
    sp = request.sampling
    stop = set(sp.stop_token_ids) | (set() if sp.ignore_eos else set(loaded.eos_token_ids))
    out: list[int] = []
    while len(out) < sp.max_tokens:
        base = None if request.contrast_prompt_ids is None else request.contrast_prompt_ids + tuple(out)
        logprobs = next_token_logprobs(loaded.model, request.prompt_ids + tuple(out), base, request.method, closed_form=True)
        token = choose_token(logprobs, sp, None, RowHistory(list(out), request.prompt_ids, frozenset(stop)))
        out.append(token)
        if token in stop and len(out) > sp.min_tokens:
            break
    return out


def test_a_batch_of_mixed_sampling_settings_matches_the_reference(tiny_model, engine):
    pref, base = prompts(3, 12, 5, 2)
    amulet = MethodSettings(method=Method.AMULET, plausibility=0.0)
    requests = [
        make_request("plain", BASE, pref, base, max_tokens=12),
        make_request("freq", BASE, pref, base, max_tokens=12, logit_bias=FAVOURED, frequency_penalty=2.0),
        make_request("pres", amulet, pref, base, max_tokens=12, logit_bias=FAVOURED, presence_penalty=2.0),
        make_request("rep", BASE, pref, base, max_tokens=12, logit_bias=FAVOURED, repetition_penalty=1.5),
        make_request("eos", amulet, pref, base, max_tokens=12, logit_bias=((EOS, 100.0),), min_tokens=3),
        make_request("mix", MethodSettings(method=Method.LA), pref, base, max_tokens=12, **MIX),
    ]
    for r in requests:
        engine.add_request(r)
    outputs = drain(engine)
    for r in requests:
        assert tokens_of(outputs[r.request_id]) == reference_tokens(tiny_model("llama"), r), r.request_id
    assert len(set(tokens_of(outputs["freq"]))) > 1


def run(engine: LLMEngine, rid: str, **sampling) -> tuple[list[int], str]:
    pref, base = prompts(5, 10, 4, 2)
    engine.add_request(make_request(rid, BASE, pref, base, max_tokens=sampling.pop("max_tokens", 24), **sampling))
    outs = drain(engine)[rid]
    return tokens_of(outs), outs[-1].finish_reason


def test_the_frequency_penalty_spreads_the_repeats(engine):
    plain, _ = run(engine, "a", logit_bias=FAVOURED, ignore_eos=True)
    penalized, _ = run(engine, "b", logit_bias=FAVOURED, ignore_eos=True, frequency_penalty=2.0)
    assert set(plain) <= {100, 200, 300, 400} and set(penalized) <= {100, 200, 300, 400}
    top_plain = Counter(plain).most_common(1)[0][1]
    top_penalized = Counter(penalized).most_common(1)[0][1]
    assert top_penalized < top_plain
    assert top_penalized <= 24 // 4 + 3  # 2.0 per repeat soon outweighs the model's preferences


def test_min_tokens_holds_off_eos_then_eos_stops(engine):
    assert run(engine, "now", logit_bias=((EOS, 100.0),)) == ([EOS], "stop")
    tokens, reason = run(engine, "later", logit_bias=((EOS, 100.0),), min_tokens=5)
    assert reason == "stop" and len(tokens) == 6 and tokens[-1] == EOS and EOS not in tokens[:-1]


def test_stop_token_ids_stop_and_ignore_eos_continues(engine):
    assert run(engine, "stop", logit_bias=((777, 100.0),), stop_token_ids=(777,)) == ([777], "stop")
    tokens, reason = run(engine, "on", logit_bias=((EOS, 100.0),), ignore_eos=True, max_tokens=4)
    assert (tokens, reason) == ([EOS] * 4, "length")


def test_a_logit_bias_token_outside_the_vocabulary_is_refused(engine):
    pref, base = prompts(5, 10, 4, 2)
    vocab = engine.vocab_size
    with pytest.raises(InvalidParameterError) as caught:
        engine.add_request(make_request("x", BASE, pref, base, logit_bias=((vocab, 1.0),)))
    assert caught.value.param == "logit_bias" and str(vocab) in caught.value.message
    assert "x" not in engine.requests
    engine.add_request(make_request("ok", BASE, pref, base, max_tokens=2, logit_bias=((vocab - 1, 1.0),)))
    assert len(tokens_of(drain(engine)["ok"])) >= 1


def test_min_tokens_with_amulet_when_only_the_end_is_plausible(tiny_model):
    """A model that wants to end at once in every context (its end-of-text logit raised by 40 in the runner's output):
    amulet's plausibility mask keeps end-of-text alone, and ``min_tokens`` rules it out. The stop ids are ruled out
    in the contexts' logits before the combination, so the mask counts from the most likely token that may come: the
    request gets its four tokens, then ends. (Before, nothing was left to choose and the request failed: seen with
    SmolLM2, a concise storyteller asked for a long story.)"""
    engine = LLMEngine(tiny_model("llama"), EngineConfig(max_model_len=256, kv_cache_tokens=8192))

    def wants_to_end(chunks, logits_for, logits):
        with torch.inference_mode():
            logits[:, EOS] += 40.0  # (a contrast row left undone: NaN here, read at its plausible tokens only)

    spy_passes(engine, wants_to_end, whole_rows=False)
    pref, base = prompts(31, 12, 4, 2)
    engine.add_request(make_request("m", MethodSettings(), pref, base, max_tokens=8, min_tokens=4))
    outs = drain(engine)["m"]
    assert outs[-1].error is None, outs[-1].error
    tokens = tokens_of(outs)
    assert len(tokens) == 5 and EOS not in tokens[:4] and tokens[4] == EOS
    assert outs[-1].finish_reason == "stop"
