"""The decode graph's tail: a step's method and greedy choice computed with its forward pass give the same bits.

On the CPU the decode graphs' padded path runs eagerly with the tail computed as a captured graph would compute it
(from the static per-request inputs over the whole logits buffer). Compared with the host path (method_logprobs and
the sampler): the fixed-shape arithmetic row by row, then the engine's answers (token ids and log-probabilities,
every method, overlapped or not), and which steps may use it at all.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from amulet_core.engine.config import EngineConfig
from amulet_core.engine.decode_tail import DecodeTail, tail_eligible, tail_rows
from amulet_core.engine.llm_engine import LLMEngine
from amulet_core.method.rows import RowSpec, method_logprobs
from amulet_core.method.settings import Method, MethodSettings
from amulet_core.sampling.params import SamplingParams
from amulet_core.sampling.sampler import read_samples, sample_on_device
from tests.engine.test_decode_graphs import padded_engine
from tests.engine.test_engine import METHODS, drain, make_request, prompts
from tests.engine.test_overlap import comparable

VOCAB = 300
AMULET = MethodSettings(method=Method.AMULET)
STRICT = MethodSettings(method=Method.AMULET, plausibility=0.3)
LOOSE = MethodSettings(method=Method.AMULET, plausibility=0.0)
WEAK = MethodSettings(method=Method.LA, strength=0.5)  # A below 1: toward the contrast
FLAT = dataclasses.replace(WEAK, plausibility=0.0)
"""A flat distribution (A below 1, no plausibility): a second log-softmax of it changes some bits."""


def logits_with_holes(rows: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, VOCAB, generator=generator) * 4
    holes = torch.rand(rows, VOCAB, generator=generator) < 0.05  # impossible tokens, in some contexts only
    return logits.masked_fill(holes, float("-inf"))


def pair(row: int, method: MethodSettings) -> RowSpec:
    return RowSpec(row, row + 1, method, method.effective_strength)


def plain(row: int, method: MethodSettings = METHODS[0]) -> RowSpec:
    return RowSpec(row, None, method, None)


LAYOUTS = {
    # the in-place path; the rows without plausibility have the second pass too, as one row has a plausibility
    "pairs": [pair(0, AMULET), pair(2, STRICT), pair(4, LOOSE), *(pair(row, FLAT) for row in (6, 8, 10, 12))],
    "pairs without plausibility": [pair(0, LOOSE), pair(2, FLAT)],  # no second pass
    "mixed": [plain(0), pair(1, AMULET), plain(3, METHODS[1]), pair(4, WEAK), plain(6)],
    "plain": [plain(0), plain(1), plain(2)],
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_tail_gives_the_bits_of_the_method_and_the_greedy_sampler(layout):
    specs = LAYOUTS[layout]
    rows = 1 + max(s.contrast if s.contrast is not None else s.primary_row for s in specs)
    slots = 16  # a padded bucket: the tail reads a logits buffer with rows past the step's
    buffer = torch.zeros(slots, VOCAB)
    buffer[:rows] = logits_with_holes(rows, seed=len(layout))
    logits = buffer[:rows]
    greedy = [SamplingParams(temperature=0, logprobs=True)] * len(specs)

    host = sample_on_device(method_logprobs(logits, specs), greedy, [None] * len(specs))
    tail = DecodeTail(slots, slots, logits.device)
    tail.set_rows(tail_rows(specs, range(rows)))
    tail.compute(buffer, slots)
    samples = tail.samples()

    assert torch.equal(samples.tokens, host.tokens)
    assert torch.equal(samples.packed, host.packed)  # tokens, log-probabilities (the same bits), failed flags
    assert read_samples(samples.packed.tolist(), greedy, 0) == read_samples(host.packed.tolist(), greedy, 0)


def test_which_requests_the_tail_may_choose_for():
    spec = pair(0, AMULET)
    assert tail_eligible(spec, SamplingParams(temperature=0)) and tail_eligible(plain(0), SamplingParams(temperature=0))
    assert tail_eligible(spec, SamplingParams(temperature=0, logprobs=True))  # the chosen token's: in the copy
    several = RowSpec(0, 2, AMULET, 5.0, extra_rows=(1,), weights=(0.5, 0.5))
    for params, row in [
        (SamplingParams(temperature=0.7), spec),  # sampled
        (SamplingParams(temperature=0, logit_bias=((5, 2.0),)), spec),
        (SamplingParams(temperature=0, min_tokens=3), spec),
        (SamplingParams(temperature=0, presence_penalty=0.5), spec),
        (SamplingParams(temperature=0, logprobs=True, top_logprobs=2), spec),
        (SamplingParams(temperature=0), several),  # two preference contexts
    ]:
        assert not tail_eligible(row, params), (params, row)


def test_set_rows_refuses_rows_outside_the_buffer():
    tail = DecodeTail(4, 4, torch.device("cpu"))
    with pytest.raises(ValueError):
        tail.set_rows(tail_rows([pair(3, AMULET)], range(5)))  # its contrast is row 4 of a 4-row buffer
    with pytest.raises(ValueError):
        tail.set_rows([])


FIELDS = {"max_model_len": 256, "kv_cache_tokens": 4096}


def greedy_requests():
    pref, base = prompts(31, shared=14, pref_extra=6, base_extra=2)
    methods = [*METHODS, STRICT, WEAK]
    return [
        make_request(f"g{i}", method, pref, base, max_tokens=9, logprobs=True, ignore_eos=i % 2 == 0)
        for i, method in enumerate(methods)
    ]


def answers(engine: LLMEngine, requests) -> dict[str, list]:
    for request in requests:
        engine.add_request(request)
    outputs = drain(engine)
    assert not engine.has_work() and engine.blocks.num_used == 0
    return {rid: [comparable(o) for o in got] for rid, got in outputs.items()}


def graphed_engine(loaded, config: EngineConfig, tail: bool) -> LLMEngine:
    """An engine whose decode steps take the decode graphs' padded path (captured on CUDA, eager on a CPU), with or
    without the tail: the same forward passes, so the same logits, either way."""
    engine = padded_engine(loaded, config)
    if not tail:
        engine._tail_samples = lambda *args: None  # type: ignore[method-assign]
    return engine


@pytest.mark.parametrize("overlap", [True, False])
def test_the_engine_answers_the_same_with_the_tail_choosing_the_tokens(tiny_model, overlap):
    """Every method's greedy answer and each token's log-probability are the same, bit for bit, whether the tail or the
    host chose them; with the tail, every decode step used it."""
    loaded = tiny_model("llama")
    config = EngineConfig(**FIELDS, overlap_host=overlap)
    requests = greedy_requests()
    with_tail, without = graphed_engine(loaded, config, tail=True), graphed_engine(loaded, config, tail=False)
    assert answers(with_tail, requests) == answers(without, requests)
    graphs = with_tail.runner.graphs
    assert graphs is not None and graphs.tail_steps >= 8 and graphs.tail_steps == graphs.steps
    assert without.runner.graphs is not None and without.runner.graphs.tail_steps == 0
    assert (with_tail.overlapped_steps >= graphs.steps) == overlap  # the decode steps, and the prefill before them


def test_a_step_with_a_request_the_tail_cannot_serve_takes_the_host_path(tiny_model):
    """A sampled request or one with a logit bias beside greedy ones: their steps replay the graphs without the tail (the
    host chooses every token); once they have finished, the tail takes over; the answers are the host's."""
    loaded = tiny_model("qwen2")
    config = EngineConfig(**FIELDS, overlap_host=True)
    pref, base = prompts(32, shared=10, pref_extra=4, base_extra=3)
    requests = [
        make_request("long", AMULET, pref, base, max_tokens=14, ignore_eos=True),
        make_request("sampled", AMULET, pref, base, max_tokens=4, temperature=0.8, seed=3, ignore_eos=True),
        make_request("biased", METHODS[0], pref, base, max_tokens=5, logit_bias=((7, 3.0),), ignore_eos=True),
    ]
    with_tail = graphed_engine(loaded, config, tail=True)
    assert answers(with_tail, requests) == answers(graphed_engine(loaded, config, tail=False), requests)
    graphs = with_tail.runner.graphs
    assert graphs is not None and 0 < graphs.tail_steps < graphs.steps
