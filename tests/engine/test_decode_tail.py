"""The decode graph's tail: a step's method, logit bias and greedy choice computed with its forward pass give the same
bits.

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
from amulet_core.engine.decode_tail import DecodeTail, TailVariant, tail_eligible, tail_rows
from amulet_core.engine.llm_engine import LLMEngine
from amulet_core.method.rows import RowSpec, method_logprobs
from amulet_core.method.settings import Method, MethodSettings
from amulet_core.sampling.params import SamplingParams
from amulet_core.sampling.processors import process_row
from amulet_core.sampling.sampler import _filtered_probs, read_samples, sample_on_device
from tests.engine.test_decode_graphs import padded_engine
from tests.engine.test_engine import METHODS, drain, make_request, prompts
from tests.engine.test_multi_context_engine import MULTI, make
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


def several(rows: tuple[int, ...], weights: tuple[float, ...], contrast: int | None, method: MethodSettings) -> RowSpec:
    """K = len(rows) preference rows (``weights`` normalised here), with or without a contrast row."""
    total = sum(weights)
    coefficient = method.effective_strength if contrast is not None else None
    return RowSpec.of(rows, [w / total for w in weights], contrast, method, coefficient)


PREF = MethodSettings(method=Method.PREF)
LAYOUTS = {
    # the in-place path; the rows without plausibility have the second pass too, as one row has a plausibility
    "pairs": [pair(0, AMULET), pair(2, STRICT), pair(4, LOOSE), *(pair(row, FLAT) for row in (6, 8, 10, 12))],
    "pairs without plausibility": [pair(0, LOOSE), pair(2, FLAT)],  # no second pass
    "mixed": [plain(0), pair(1, AMULET), plain(3, METHODS[1]), pair(4, WEAK), plain(6)],
    "plain": [plain(0), plain(1), plain(2)],
    # several preferences: amulet with K = 2 and 3, pref with K = 2 (no contrast: its anchor's log-softmax, and the
    # plausibility pass's second log-softmax as a contrast row has a plausibility), beside K = 1 rows
    "several": [
        several((0, 1), (1.0, 1.0), 2, AMULET),
        plain(3),
        several((4, 5, 6), (1.0, 2.0, 4.0), 7, STRICT),
        several((8, 9), (1.0, 3.0), None, PREF),
        pair(10, FLAT),
    ],
    "several without plausibility": [several((0, 1), (2.0, 1.0), None, PREF), pair(2, FLAT), plain(4)],
}
PARAMS = {
    "greedy": lambda i: SamplingParams(temperature=0, logprobs=True),
    # a bias that changes the argmax, one on an impossible token (-inf stays -inf), a ban; top log-probabilities
    "bias and top": lambda i: SamplingParams(
        temperature=0,
        logprobs=True,
        top_logprobs=(0, 3, 5)[i % 3],
        logit_bias=(((7 * i) % VOCAB, 100.0), (11, -100.0), (5, 0.5)) if i % 2 == 0 else (),
    ),
}


@pytest.mark.parametrize("params", PARAMS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_tail_gives_the_bits_of_the_method_and_the_greedy_sampler(layout, params):
    """Over 20 draws of logits (where a second log-softmax changes bits for some of them, so a row given the
    plausibility pass wrongly, or denied it, shows)."""
    specs = LAYOUTS[layout]
    rows = 1 + max(max(s.pref_rows + ((s.contrast,) if s.contrast is not None else ())) for s in specs)
    slots = 16  # a padded bucket: the tail reads a logits buffer with rows past the step's
    chosen = [PARAMS[params](i) for i in range(len(specs))]
    tail = DecodeTail(slots, slots, VOCAB, torch.device("cpu"))
    biased = 0
    for seed in range(20):
        buffer = torch.zeros(slots, VOCAB)
        buffer[:rows] = logits_with_holes(rows, seed=seed)
        logits = buffer[:rows]
        host = sample_on_device(method_logprobs(logits, specs), chosen, [None] * len(specs))
        tail.set_rows(tail_rows(specs, range(rows), chosen))
        tail.compute(buffer, slots, tail.variant)
        samples = tail.samples()

        assert torch.equal(samples.tokens, host.tokens)
        assert samples.top_n == host.top_n
        # tokens, log-probabilities (the same bits), failed flags, top log-probabilities and their ids
        torch.testing.assert_close(samples.packed, host.packed, rtol=0, atol=0, equal_nan=True)  # NaN: a failed row
        got = read_samples(samples.packed.tolist(), chosen, samples.top_n)
        assert repr(got) == repr(read_samples(host.packed.tolist(), chosen, host.top_n))  # (repr: NaN equals NaN)
        biased += sum(s.token == (7 * i) % VOCAB for i, s in enumerate(got) if i % 2 == 0)
    assert biased > 0 or params != "bias and top"  # the bias counted (where its token is possible)


SAMPLED = [  # each with the method of its rows (None: a plain row); the top-k rows flat enough for k to cut
    (SamplingParams(temperature=0.7), None),
    (SamplingParams(temperature=1.3, min_p=0.05), AMULET),
    (SamplingParams(temperature=1.0, min_p=0.2), FLAT),
    (SamplingParams(temperature=1.2, top_k=7), None),
    (SamplingParams(temperature=0.9, top_p=0.8), FLAT),
    (SamplingParams(temperature=1.1, top_k=12, top_p=0.9, min_p=0.01), FLAT),
    (SamplingParams(temperature=1.0, top_k=VOCAB), None),  # as none
    (SamplingParams(temperature=0.8, logit_bias=((3, 4.0), (4, 2.5), (131, -100.0))), None),  # 131: the likeliest
]


@pytest.mark.parametrize("filtering", [False, True], ids=["temperature and min_p", "top-k and top-p too"])
def test_sampled_rows_draw_from_the_samplers_distribution(filtering):
    """Temperature, min_p, top-k and top-p as the sampler applies them (its per-row oracle), drawn by the exponential
    race: never a token the sampler could not draw, and the frequencies of 12,000 draws (a fixed seed) within 0.05
    in total variation of the sampler's probabilities; a greedy row beside them keeps its argmax and its bits."""
    chosen = [(p, m) for p, m in SAMPLED if filtering or (p.top_k == 0 and p.top_p == 1.0)]
    chosen.append((SamplingParams(temperature=0), AMULET))
    params = [p for p, _ in chosen]
    n = len(params)
    specs = [plain(2 * i) if method is None else pair(2 * i, method) for i, (_, method) in enumerate(chosen)]
    rows = 2 * n
    logits = logits_with_holes(rows, seed=11) / 2
    logprobs = method_logprobs(logits, specs)
    expected = [_filtered_probs(process_row(logprobs[i], p), p) for i, p in enumerate(params[:-1])]
    expected = [probs / probs.sum() for probs in expected]  # top-p leaves them unnormalised: the draw normalises
    tail = DecodeTail(16, rows, VOCAB, logits.device)
    tail.set_rows(tail_rows(specs, range(rows), params))
    assert tail.variant.filtering == filtering and tail.variant.sampled
    torch.manual_seed(1234)
    draws = 12_000
    counts = torch.zeros(n - 1, VOCAB)
    for _ in range(draws):
        tail.compute(logits, n, tail.variant)
        samples = tail.samples()
        counts[torch.arange(n - 1), samples.tokens[:-1]] += 1
        assert samples.tokens[-1] == logprobs[-1].argmax() and not samples.packed[2 * n :].any()  # greedy; no failure
    for row, probs in enumerate(expected):
        assert not counts[row][probs == 0].any(), params[row]  # nothing the sampler rules out
        distance = 0.5 * (counts[row] / draws - probs).abs().sum()
        assert distance < 0.05, (params[row], distance)


def test_which_requests_the_tail_may_choose_for():
    for params in (
        SamplingParams(temperature=0),
        SamplingParams(temperature=0, logprobs=True, top_logprobs=2),  # the alternatives: in the copy
        SamplingParams(temperature=0.7, min_p=0.1),  # drawn from the default generator
        SamplingParams(top_k=5, top_p=0.9),
        SamplingParams(temperature=0, logit_bias=((5, 2.0),)),  # fixed per request: a static table
        SamplingParams(temperature=0.9, logit_bias=((5, -100.0),)),
    ):
        assert tail_eligible(params), params
    for params in (
        SamplingParams(temperature=0.7, seed=4),  # its own generator
        SamplingParams(temperature=0, min_tokens=3),  # these read the tokens generated so far
        SamplingParams(temperature=0, presence_penalty=0.5),
        SamplingParams(temperature=0, repetition_penalty=1.2),
    ):
        assert not tail_eligible(params), params


def biased(tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, logit_bias=tuple((t, 1.0) for t in range(tokens)))


def top(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, logprobs=True, top_logprobs=n)


def test_a_step_asks_for_the_parts_of_the_tail_its_requests_need():
    """Plain greedy rows need one log-softmax and an argmax; a contrast, the plausibility pass, a draw, top-k / top-p,
    the mixture of several preferences, a bias table and top log-probabilities are added only when a request of the
    step has them (a graph holds one variant: the rest costs nothing)."""
    tail = DecodeTail(8, 8, VOCAB, torch.device("cpu"))
    greedy, drawn, cut = SamplingParams(temperature=0), SamplingParams(temperature=0.8), SamplingParams(top_p=0.9)
    cases = [
        ([plain(0), plain(1)], [greedy, greedy], TailVariant(False, False, False, False)),
        ([plain(0), pair(1, FLAT)], [greedy, greedy], TailVariant(True, False, False, False)),
        ([plain(0), pair(1, AMULET)], [greedy, drawn], TailVariant(True, True, True, False)),
        ([plain(0), pair(1, FLAT)], [cut, greedy], TailVariant(True, False, True, True)),
        ([plain(0)], [SamplingParams(temperature=0, top_k=3)], TailVariant(False, False, False, False)),  # greedy
        # several preferences: as many weighted passes as the step's largest K needs (K = 3: two)
        ([several((0, 1, 2), (1, 1, 1), None, PREF), plain(3)], [greedy, greedy], TailVariant(False, False, False, False, 2)),
        ([several((0, 1), (1, 2), 2, AMULET)], [drawn], TailVariant(True, True, True, False, 1)),
        # the bias table as wide as the step's largest bias, rounded up; the step's most top log-probabilities
        ([plain(0), plain(1)], [biased(3), biased(20)], TailVariant(False, False, False, False, 0, 128)),
        ([plain(0), pair(1, FLAT)], [biased(16), greedy], TailVariant(True, False, False, False, 0, 16)),
        ([plain(0), plain(1)], [top(2), top(7)], TailVariant(False, False, False, False, 0, 0, 7)),
    ]
    for specs, params, variant in cases:
        tail.set_rows(tail_rows(specs, range(4), params))
        assert tail.variant == variant, (specs, params)


def test_a_step_whose_rows_the_tail_cannot_hold_is_chosen_on_the_host_and_the_graphs_stay(tiny_model):
    """Rows the tail cannot hold (here: a tail of one request slot, and steps of three requests): the runner asks
    before it replays, the host path chooses those steps (the answers are the host's), the graphs are not turned
    off, and the step left with one request goes through the tail."""
    loaded = tiny_model("llama")
    engine = graphed_engine(loaded, EngineConfig(**FIELDS, overlap_host=True), tail=True)
    graphs = engine.runner.graphs
    assert graphs is not None
    if graphs.capture:
        pytest.skip("captured graphs hold the tail they were captured with")
    graphs.tail = DecodeTail(1, graphs.tail.max_rows, graphs.tail.vocab, engine.runner.device)
    pref, base = prompts(35, shared=8, pref_extra=3, base_extra=2)
    requests = [
        make_request(f"r{i}", method, pref, base, max_tokens=4 + 4 * i, logprobs=True, ignore_eos=True)
        for i, method in enumerate([METHODS[0], AMULET, STRICT])
    ]
    assert answers(engine, requests) == answers(graphed_engine(loaded, EngineConfig(**FIELDS), tail=False), requests)
    assert engine.runner.graphs is graphs and graphs.tail_enabled and 0 < graphs.tail_steps < graphs.steps


def test_set_rows_refuses_rows_outside_the_buffer():
    tail = DecodeTail(4, 4, VOCAB, torch.device("cpu"))
    with pytest.raises(ValueError):
        tail.set_rows(tail_rows([pair(3, AMULET)], range(5), [SamplingParams()]))  # its contrast: row 4 of 4
    with pytest.raises(ValueError):
        tail.set_rows([])
    with pytest.raises(ValueError):
        tail.set_rows(tail_rows([several((0, 4), (1, 1), None, PREF)], range(5), [SamplingParams()]))  # row 4 of 4
    with pytest.raises(ValueError):  # a token past the vocabulary would bias another row's score
        tail.set_rows(tail_rows([plain(0)], range(1), [SamplingParams(logit_bias=((VOCAB, 1.0),))]))
    # what the runner asks before it replays (rows the tail cannot hold go to the host path; the graphs stay)
    small = DecodeTail(4, 4, 12, torch.device("cpu"))  # a vocabulary of 12: at most 12 top log-probabilities
    assert small.problem(tail_rows([plain(0)], range(1), [SamplingParams(logprobs=True, top_logprobs=12)])) is None
    assert "top log-probabilities" in str(small.problem(tail_rows([plain(0)], range(1), [top(13)])))
    assert small.problem(tail_rows([pair(2, AMULET)], range(4), [SamplingParams()])) is None


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
    """A seeded sampled request or one with a penalty beside greedy ones: their steps replay the graphs without the
    tail (the host chooses every token); once they have finished, the tail takes over; the answers are the host's."""
    loaded = tiny_model("qwen2")
    config = EngineConfig(**FIELDS, overlap_host=True)
    pref, base = prompts(32, shared=10, pref_extra=4, base_extra=3)
    requests = [
        make_request("long", AMULET, pref, base, max_tokens=14, ignore_eos=True),
        make_request("sampled", AMULET, pref, base, max_tokens=4, temperature=0.8, seed=3, ignore_eos=True),
        make_request("penalised", METHODS[0], pref, base, max_tokens=5, presence_penalty=1.5, ignore_eos=True),
    ]
    with_tail = graphed_engine(loaded, config, tail=True)
    assert answers(with_tail, requests) == answers(graphed_engine(loaded, config, tail=False), requests)
    graphs = with_tail.runner.graphs
    assert graphs is not None and 0 < graphs.tail_steps < graphs.steps


def test_several_preferences_a_logit_bias_and_top_logprobs_are_the_tails_with_the_hosts_answers(tiny_model):
    """Requests of two and three weighted preference contexts (amulet, la, pref), one with a logit bias and one with
    top log-probabilities, beside single-preference ones: every decode step is the tail's, and the answers (token ids,
    log-probabilities, the alternatives) are the host path's, bit for bit."""
    loaded = tiny_model("qwen2")
    config = EngineConfig(**FIELDS, overlap_host=True)
    pref, base = prompts(34, shared=12, pref_extra=5, base_extra=2)
    vocab = int(loaded.model.config.vocab_size)
    requests = [
        *(make(f"k{i}", settings, seed=40 + i, max_tokens=8, logprobs=True) for i, settings in enumerate(MULTI)),
        make("biased-k2", MULTI[0], seed=50, max_tokens=8, logit_bias=((vocab - 1, 6.0), (3, -100.0))),
        make_request("top", AMULET, pref, base, max_tokens=8, logprobs=True, top_logprobs=4, ignore_eos=True),
        make_request("base", METHODS[0], pref, base, max_tokens=8, logit_bias=((17, 2.5),), ignore_eos=True),
    ]
    with_tail = graphed_engine(loaded, config, tail=True)
    got = answers(with_tail, requests)
    assert got == answers(graphed_engine(loaded, config, tail=False), requests)
    graphs = with_tail.runner.graphs
    assert graphs is not None and graphs.tail_steps == graphs.steps >= 7
    assert all(len(lp.top) == 4 for out in got["top"] for lp in out[2])  # each token's four alternatives
    assert 3 not in [t for out in got["biased-k2"] for t in out[1]]  # banned


def test_unseeded_sampled_requests_are_drawn_in_the_tail_beside_greedy_ones(tiny_model):
    """Requests sampled at a temperature (with min_p, top-k, top-p) without a seed, as OpenAI clients send them,
    beside greedy ones: every decode step is the tail's; the greedy answers are the host's, bit for bit; the sampled
    ones run their length; the draws vary with the default generator's state, as an unseeded request's do."""
    loaded = tiny_model("llama")
    config = EngineConfig(**FIELDS, overlap_host=True)
    pref, base = prompts(33, shared=12, pref_extra=5, base_extra=2)

    def batch() -> list:
        return [
            make_request("greedy", AMULET, pref, base, max_tokens=10, logprobs=True, ignore_eos=True),
            make_request("warm", AMULET, pref, base, max_tokens=10, temperature=1.5, ignore_eos=True),
            make_request("cut", METHODS[0], pref, base, max_tokens=10, temperature=1.0, min_p=0.3, ignore_eos=True),
            make_request("top", AMULET, pref, base, max_tokens=10, temperature=1.0, top_k=20, top_p=0.9, ignore_eos=True),
        ]

    vocab = int(loaded.model.config.vocab_size)
    with_tail = graphed_engine(loaded, config, tail=True)
    torch.manual_seed(5)
    first = answers(with_tail, batch())
    graphs = with_tail.runner.graphs
    assert graphs is not None and graphs.tail_steps == graphs.steps >= 9
    torch.manual_seed(6)
    second = answers(with_tail, batch())
    host = answers(graphed_engine(loaded, config, tail=False), batch())
    tokens_and_logprobs = [[out[:3] for out in got["greedy"]] for got in (first, second, host)]
    assert tokens_and_logprobs[0] == tokens_and_logprobs[1] == tokens_and_logprobs[2]  # (the usage: cache hits)
    for got in (first, second):
        for rid in ("warm", "cut", "top"):
            tokens = [t for out in got[rid] for t in out[1]]
            assert len(tokens) == 10 and got[rid][-1][3] == "length" and all(0 <= t < vocab for t in tokens)
    assert first["warm"] != second["warm"]  # ten tokens at temperature 1.5 from another generator state


def test_a_failing_tail_is_turned_off_and_the_host_chooses_the_tokens(tiny_model, caplog):
    """The tail failing (an operation a graph cannot hold on some device): it is turned off, the graphs stay, that
    step and every later one choose on the host, and the answers are the host path's."""
    loaded = tiny_model("llama")
    config = EngineConfig(**FIELDS, overlap_host=True)
    with_tail = graphed_engine(loaded, config, tail=True)
    graphs = with_tail.runner.graphs
    assert graphs is not None
    if graphs.capture:  # captured at start-up, the graphs never call it again
        pytest.skip("the eager path's failure: on CUDA the tail is computed while capturing, not per step")
    compute = graphs.tail.compute
    calls = 0

    def failing(*args, **kwargs) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("injected: operation not permitted when stream is capturing")
        compute(*args, **kwargs)

    graphs.tail.compute = failing  # type: ignore[method-assign]
    requests = greedy_requests()
    assert answers(with_tail, requests) == answers(graphed_engine(loaded, config, tail=False), requests)
    assert not graphs.tail_enabled and graphs.tail_steps == 2 and calls == 3
    assert with_tail.runner.graphs is graphs and graphs.steps > graphs.tail_steps + 5  # the graphs went on
    assert "the decode graphs' tail failed" in caplog.text


def test_a_tail_that_fails_to_capture_at_start_up_is_turned_off_and_the_graphs_kept(tiny_model, caplog):
    """Start-up capture: every tail-less bucket first; the first tail variant that fails turns the tail off (logged),
    the rest of the start-up capture stops there, and the graphs captured stay in use."""
    loaded = tiny_model("llama")
    config = EngineConfig(max_model_len=128, kv_cache_tokens=2048, max_num_seqs=4, graph_capture_seconds=0)
    runner = LLMEngine(loaded, config).runner
    if runner.device.type == "cuda":
        pytest.skip("the capture is faked on the CPU; CUDA captures for real at the engine's start")
    runner.use_decode_graphs(capture=False)
    graphs = runner.graphs
    assert graphs is not None
    graphs.capture = True
    tried = []

    def fake_capture(bucket, tail=None):  # a capture whose graph is its eager forward pass
        tried.append((bucket, tail))
        if tail is not None:
            raise RuntimeError("injected: operation not permitted when stream is capturing")
        graphs.graphs[bucket] = None

    graphs._capture = fake_capture  # type: ignore[method-assign]
    buckets = len(graphs.batch_sizes) * len(graphs.context_lens)
    with torch.inference_mode():
        assert graphs.capture_at_start(1000.0, clock=lambda: 0.0) == buckets
    assert len(tried) == buckets + 1 and not graphs.tail_enabled and len(graphs.graphs) == buckets
    assert "capturing the decode graphs' tail failed" in caplog.text
