"""The decode graph's tail: a step's method, logit bias and greedy choice computed with its forward pass give the same
bits.

On the CPU the decode graphs' padded path runs eagerly with the tail computed as a captured graph would compute it
(from the static per-request inputs over the whole logits buffer). Compared with the host path (method_logprobs and
the sampler): the fixed-shape arithmetic row by row, then the engine's answers (token ids and log-probabilities,
every method, overlapped or not), and which steps may use it at all.
"""

from __future__ import annotations

import dataclasses
import logging
import re

import pytest
import torch

from amulet_core.device_tensors import StagedTensors
from amulet_core.engine.config import EngineConfig
from amulet_core.engine.decode_graphs import DecodeGraphs
from amulet_core.engine.decode_tail import DecodeTail, TailVariant
from amulet_core.engine.graph_buckets import START_TAIL_VARIANTS
from amulet_core.engine.llm_engine import LLMEngine
from amulet_core.engine.protocol import GenerationRequest, ThinkingSpan
from amulet_core.engine.step_rows import tail_history
from amulet_core.engine.tail_processors import TailProcessors
from amulet_core.engine.tail_rows import TailHistory, tail_rows
from amulet_core.grammar.masks import grammar_masks
from amulet_core.grammar.spec import GrammarKind, GrammarSpec
from amulet_core.method.rows import RowSpec, method_logprobs
from amulet_core.method.settings import Method, MethodSettings
from amulet_core.sampling.params import SamplingParams
from amulet_core.sampling.processors import RowHistory, apply_processors, process_row
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


PENALIZED = {
    "penalties and min_tokens": lambda i: SamplingParams(
        temperature=0,
        logprobs=True,
        repetition_penalty=(1.0, 1.3, 0.8)[i % 3],
        frequency_penalty=(0.0, 0.7, -0.5, 1.9)[i % 4],
        presence_penalty=(0.4, 0.0, 1.1)[i % 3],
        min_tokens=(0, 6, 2)[i % 3],  # 5 tokens generated: row 1's stop ids are still ruled out
    ),
}
PROMPT = (5, 9, 9, 40, 77, 123, 299, 5)
STOPS = (2, 17, 250)


def history_of(i: int, vocab: int = VOCAB) -> list[int]:
    """Request i's five generated tokens (repeats, a prompt token, an id past the vocabulary, left out)."""
    return [(3 * i + 7) % vocab, 40, vocab + 4 if i % 2 else 77, (3 * i + 7) % vocab, 200 + i]


def histories(specs, chosen, rows: int, slots: int) -> tuple[list, list, torch.Tensor, torch.Tensor]:
    """The host's histories, the tail's (the last token pending on the device for odd requests: the step's input
    token), the step's input token ids, and the logits after ``min_tokens``' rule (``rule_out_early_stops``: the
    ruled-out stop ids at -inf in every context row of the request)."""
    host, tail = [], []
    inputs = torch.randint(0, VOCAB, (slots,), generator=torch.Generator().manual_seed(rows))
    for i, (spec, p) in enumerate(zip(specs, chosen, strict=True)):
        out = history_of(i)
        stops = STOPS if len(out) < p.min_tokens else ()
        host.append(RowHistory(out, PROMPT if p.repetition_penalty != 1 else (), stops))
        pending = i % 2 == 1
        inputs[spec.primary_row] = out[-1] if pending else (out[-1] + 1) % VOCAB  # the input: pending, or not counted
        known = out[:-1] if pending else out
        tail.append(TailHistory(known, PROMPT if p.repetition_penalty != 1 else (), pending, stops))
    return host, tail, inputs, torch.tensor(0)


@pytest.mark.parametrize("params", [*PARAMS, *PENALIZED])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_tail_gives_the_bits_of_the_method_and_the_greedy_sampler(layout, params):
    """Over 20 draws of logits (where a second log-softmax changes bits for some of them, so a row given the
    plausibility pass wrongly, or denied it, shows). With penalties and ``min_tokens``, against the sampler's
    processors over the whole history, the tail reading the last token from the step's input token ids where it is
    pending."""
    specs = LAYOUTS[layout]
    rows = 1 + max(max(s.pref_rows + ((s.contrast,) if s.contrast is not None else ())) for s in specs)
    slots = 16  # a padded bucket: the tail reads a logits buffer with rows past the step's
    chosen = [{**PARAMS, **PENALIZED}[params](i) for i in range(len(specs))]
    host_histories, tail_histories, inputs = None, None, None
    if params in PENALIZED:
        host_histories, tail_histories, inputs, _ = histories(specs, chosen, rows, slots)
    tail = DecodeTail(slots, slots, VOCAB, torch.device("cpu"), max_history=100)
    biased = 0
    for seed in range(20):
        buffer = torch.zeros(slots, VOCAB)
        buffer[:rows] = logits_with_holes(rows, seed=seed)
        logits = buffer[:rows].clone()
        if host_histories is not None:  # step_rows.rule_out_early_stops: every context row of a ruled-out request
            for spec, history in zip(specs, host_histories, strict=True):
                for row in (*spec.pref_rows, *(() if spec.contrast is None else (spec.contrast,))):
                    logits[row, list(history.stop_ids)] = float("-inf")
        host = sample_on_device(method_logprobs(logits, specs), chosen, [None] * len(specs), host_histories)
        tail.set_rows(tail_rows(specs, range(rows), chosen, tail_histories))
        tail.compute(buffer, slots, tail.variant, inputs)
        samples = tail.samples()

        assert torch.equal(samples.tokens, host.tokens)
        assert samples.top_n == host.top_n
        # tokens, log-probabilities (the same bits), failed flags, top log-probabilities and their ids
        torch.testing.assert_close(samples.packed, host.packed, rtol=0, atol=0, equal_nan=True)  # NaN: a failed row
        got = read_samples(samples.packed.tolist(), chosen, samples.top_n)
        assert repr(got) == repr(read_samples(host.packed.tolist(), chosen, host.top_n))  # (repr: NaN equals NaN)
        biased += sum(s.token == (7 * i) % VOCAB for i, s in enumerate(got) if i % 2 == 0)
    assert biased > 0 or params != "bias and top"  # the bias counted (where its token is possible)


class RandomMask:
    """A grammar mask filler of ``words`` int32 words allowing a random share of the tokens (none when ``share`` is
    0), as a compiled grammar's matcher fills its row."""

    def __init__(self, seed: int, share: float, words: int = -(-VOCAB // 32)) -> None:
        self.mask_words = words
        generator = torch.Generator().manual_seed(seed)
        allowed = torch.rand(words * 32, generator=generator) < share
        weights = torch.tensor([1 << b if b < 31 else -(1 << 31) for b in range(32)], dtype=torch.int64)
        self.words = (allowed.view(words, 32).long() * weights).sum(1).to(torch.int32)

    def fill_mask(self, bitmask: torch.Tensor, row: int) -> None:
        bitmask[row] = self.words


@pytest.mark.parametrize("layout", LAYOUTS)
def test_grammar_masks_in_the_tail_give_the_bits_of_the_host_path(layout):
    """Grammar masks on some rows (folded into the plausibility pass where a row has it, else applied and the row
    renormalised; some narrower than the vocabulary, whose tokens past them are banned; some that allow nothing:
    failed rows), with biases and top log-probabilities: the same tokens, log-probabilities and alternatives as
    ``method_logprobs`` with ``grammar_masks`` and the sampler, over 20 draws of logits."""
    specs = LAYOUTS[layout]
    rows = 1 + max(max(s.pref_rows + ((s.contrast,) if s.contrast is not None else ())) for s in specs)
    slots = 16
    chosen = [PARAMS["bias and top"](i) for i in range(len(specs))]
    tail = DecodeTail(slots, slots, VOCAB, torch.device("cpu"))
    failed = 0
    for seed in range(20):
        masked = [i for i in range(len(specs)) if (i + seed) % 3 != 1]
        words = VOCAB // 32 - 1 if seed % 4 == 0 else -(-VOCAB // 32)  # narrower: the tokens past 32 x 8 banned
        shares = [(0.3, 0.05, 0.6)[i % 3] for i in masked]
        if seed % 7 == 3:
            shares[0] = 0.0  # a mask that allows nothing
        fillers = [RandomMask(100 * seed + i, share, words) for i, share in zip(masked, shares, strict=True)]
        buffer = torch.zeros(slots, VOCAB)
        buffer[:rows] = logits_with_holes(rows, seed=seed)
        masks = grammar_masks(masked, fillers, VOCAB) if masked else None
        host = sample_on_device(method_logprobs(buffer[:rows].clone(), specs, masks), chosen, [None] * len(specs))
        tail.set_rows(tail_rows(specs, range(rows), chosen), masks)
        assert tail.variant.grammar == bool(masked)
        tail.compute(buffer, slots, tail.variant)
        samples = tail.samples()
        assert torch.equal(samples.tokens, host.tokens)
        torch.testing.assert_close(samples.packed, host.packed, rtol=0, atol=0, equal_nan=True)
        failed += int(samples.packed[2 * len(specs) : 3 * len(specs)].sum())
    assert failed > 0  # the masks that allow nothing: their rows failed, as on the host


def test_the_tails_processors_give_the_samplers_scores_over_whole_rows():
    """The bias and the penalties of the tail's tables (the last token pending on the device for odd rows, read from
    the step's input tokens) against the sampler's processors over the whole history: every score of every row, bit
    for bit (the rows' tokens never seen keep their scores), with rows without any processor beside them."""
    n, slots = 9, 12
    specs = [plain(i) for i in range(n)]
    chosen = [PENALIZED["penalties and min_tokens"](i) for i in range(n - 2)]
    chosen += [SamplingParams(temperature=0), SamplingParams(temperature=0, logit_bias=((3, 2.5), (40, -1.0)))]
    chosen[2] = dataclasses.replace(chosen[2], logit_bias=((40, 7.0), (299, -100.0)))
    host_histories, tail_histories, inputs, _ = histories(specs, chosen, n, slots)
    logprobs = torch.log_softmax(logits_with_holes(slots, seed=3), dim=-1)
    processors = TailProcessors(slots, VOCAB, 100, torch.device("cpu"))
    bias, stops, history = processors.set(tail_rows(specs, range(n), chosen, tail_histories))
    assert (bias, stops, history) == (16, 8, 64)
    processors.rule_out(logprobs, slots, stops)  # min_tokens' stop ids: -inf before the method, in the tail
    expected = apply_processors(logprobs[:n], chosen, host_histories)
    got = processors.apply(logprobs, slots, (bias, history), inputs[:slots])
    torch.testing.assert_close(got[:n], expected, rtol=0, atol=0, equal_nan=True)
    assert not torch.equal(got[:n], logprobs[:n])  # the processors did something
    # each pending token counts: without the step's input tokens, the odd rows' scores differ
    moved = processors.apply(logprobs, slots, (bias, history), (inputs[:slots] + 1) % VOCAB)
    assert all(not torch.equal(moved[i], expected[i]) for i in range(1, n - 2, 2) if chosen[i].penalized)


def test_ids_outside_the_vocabulary_count_nowhere_even_past_a_c_int():
    """The penalties' table copies ids as C ints: ids outside the vocabulary stay in it and the graph counts them in a
    column past it (nowhere); a row with an id no C int holds is filtered first. Either way the scores are the
    sampler's, which leaves such ids out."""
    params = SamplingParams(temperature=0, repetition_penalty=1.4, frequency_penalty=0.6, presence_penalty=0.3)
    outputs = ([5, -3, 7, VOCAB + 4, 5], [5, 2**40, -(2**33), 7, VOCAB, 5])
    prompt = (9, -1, VOCAB + 1, 40)
    tail = [TailHistory(out, prompt) for out in outputs]
    host = [RowHistory(out, prompt, ()) for out in outputs]
    specs = [plain(0), plain(1)]
    processors = TailProcessors(4, VOCAB, 100, torch.device("cpu"))
    rows = tail_rows(specs, range(2), [params, params], tail)
    _, _, history = processors.set(rows)
    lengths = processors.lengths[:, :2].tolist()
    assert lengths == [[5, 3], [4, 4], [0, 0]]  # as they are, but the second row's outputs filtered (5, 7, 5)
    logprobs = torch.log_softmax(logits_with_holes(4, seed=8), dim=-1)
    inputs = torch.tensor([3, 3, 0, 0])  # the step's input tokens (not pending: not counted)
    got = processors.apply(logprobs, 4, (0, history), inputs)
    expected = apply_processors(logprobs[:2], [params, params], host)
    torch.testing.assert_close(got[:2], expected, rtol=0, atol=0, equal_nan=True)


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


def test_the_common_steps_replay_variants_captured_at_start_up():
    """Steps of ``amulet`` or ``base`` requests with the API's defaults (greedy, or a temperature with top-p 1), with
    a grammar's masks or without (structured outputs, tools), ask for variants that start-up captures: the first
    such requests do not pay for a capture."""
    tail = DecodeTail(8, 8, VOCAB, torch.device("cpu"))
    fillers = [RandomMask(i, 0.5, -(-VOCAB // 32)) for i in range(2)]
    for params in (SamplingParams(temperature=0), SamplingParams()):
        for specs in ([plain(0), plain(1)], [pair(0, AMULET), pair(2, AMULET)], [pair(0, AMULET), plain(2)]):
            for masks in (None, grammar_masks([1], fillers[1:], VOCAB), grammar_masks([0, 1], fillers, VOCAB)):
                tail.set_rows(tail_rows(specs, range(4), [params] * len(specs)), masks)
                assert tail.variant in START_TAIL_VARIANTS, (specs, params, masks)


def eager_tail_engine(loaded) -> tuple[LLMEngine, DecodeGraphs]:
    """An overlapped engine whose decode graphs and tail run eagerly (a test that changes the tail after capture
    skips on a device that captures)."""
    engine = graphed_engine(loaded, EngineConfig(**FIELDS, overlap_host=True), tail=True)
    graphs = engine.runner.graphs
    assert graphs is not None
    if graphs.capture:
        pytest.skip("captured graphs hold the tail they were captured with")
    return engine, graphs


def test_a_step_whose_rows_the_tail_cannot_hold_is_chosen_on_the_host_and_the_graphs_stay(tiny_model):
    """Rows the tail cannot hold (here: a tail of one request slot, and steps of three requests): the runner asks
    before it replays, the host path chooses those steps (the answers are the host's), the graphs are not turned
    off, and the step left with one request goes through the tail."""
    loaded = tiny_model("llama")
    engine, graphs = eager_tail_engine(loaded)
    graphs.tail = DecodeTail(1, graphs.tail.max_rows, graphs.tail.vocab, engine.runner.device)
    pref, base = prompts(35, shared=8, pref_extra=3, base_extra=2)
    requests = [
        make_request(f"r{i}", method, pref, base, max_tokens=4 + 4 * i, logprobs=True, ignore_eos=True)
        for i, method in enumerate([METHODS[0], AMULET, STRICT])
    ]
    assert answers(engine, requests) == answers(graphed_engine(loaded, EngineConfig(**FIELDS), tail=False), requests)
    assert engine.runner.graphs is graphs and graphs.tail_enabled and 0 < graphs.tail_steps < graphs.steps


def test_a_grammar_step_whose_tail_fails_is_chosen_on_the_host_from_its_launched_forward(tiny_model, caplog):
    """Grammar requests whose steps launch their forward pass before their masks are made (the tokens of the step in
    flight read meanwhile); the tail fails in the fourth such step (an operation the device cannot run, say): that
    step's tokens are chosen on the host from the launched forward pass's logits (the answers are the host path's),
    the tail is turned off with a logged error and the graphs stay."""
    loaded = tiny_model("qwen2")
    engine, graphs = eager_tail_engine(loaded)
    pref, base = prompts(36, shared=8, pref_extra=3, base_extra=2)
    digits = GrammarSpec(GrammarKind.REGEX, "[0-9]{12}")
    requests = [
        make_request("amulet", AMULET, pref, base, max_tokens=9, logprobs=True, grammar=digits),
        make_request("base", METHODS[0], pref, base, max_tokens=10, logprobs=True, top_logprobs=2, grammar=digits),
    ]
    launched, chosen_on_the_host = [], []
    runner, compute = engine.runner, graphs.tail.compute
    launch, logits_after = runner.launch_forward, runner.logits_after
    runner.launch_forward = lambda *args: launched.append(launch(*args)) or launched[-1]  # type: ignore[method-assign]
    runner.logits_after = lambda *args: chosen_on_the_host.append(logits_after(*args)) or chosen_on_the_host[-1]  # type: ignore[method-assign]

    def failing(*args, **kwargs):
        if len(launched) == 4:
            raise RuntimeError("no such kernel on this device")
        return compute(*args, **kwargs)

    graphs.tail.compute = failing  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR):
        assert answers(engine, requests) == answers(graphed_engine(loaded, EngineConfig(**FIELDS), tail=False), requests)
    assert "the decode graphs' tail failed" in caplog.text
    assert engine.runner.graphs is graphs and not graphs.tail_enabled and 0 < graphs.tail_steps < graphs.steps
    assert len(launched) == 4 and all(launched) and len(chosen_on_the_host) == 1


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
    long = [TailHistory(output_ids=[1] * 64)]  # with the input token: 65 columns, past the table's 64
    penalised = [SamplingParams(frequency_penalty=0.5)]
    assert "history" in str(small.problem(tail_rows([plain(0)], range(1), penalised, long)))
    assert small.problem(tail_rows([plain(0)], range(1), [SamplingParams()], long)) is None  # no penalty: no table


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


def test_grammar_requests_are_the_tails_and_overlapped_with_the_hosts_answers(tiny_model):
    """Requests with a grammar (regex, JSON schema; amulet, base, la) beside greedy ones: every decode step is the
    tail's (their masks made on the host, applied in the graph) and overlapped: a step that holds one launches its
    forward pass, reads and accepts the tokens of the step in flight meanwhile, then makes its masks and launches
    the tail alone; the answers are the host path's, bit for bit."""
    loaded = tiny_model("qwen2")
    config = EngineConfig(**FIELDS, overlap_host=True)
    pref, base = prompts(32, shared=10, pref_extra=4, base_extra=3)
    digits = GrammarSpec(GrammarKind.REGEX, "[0-9]{3}")
    schema = GrammarSpec(GrammarKind.JSON_SCHEMA, '{"type": "object", "properties": {"a": {"type": "integer"}}}')
    ten_digits = GrammarSpec(GrammarKind.REGEX, "[0-9]{10}")
    alternating = GrammarSpec(GrammarKind.REGEX, "([0-9][a-z]){6}")  # each mask other than the last

    def batch() -> list:
        return [
            make_request("long", AMULET, pref, base, max_tokens=16, logprobs=True, ignore_eos=True),
            make_request("digits", AMULET, pref, base, max_tokens=6, logprobs=True, top_logprobs=3, grammar=digits),
            make_request("json", METHODS[0], pref, base, max_tokens=10, grammar=schema),
            make_request("weak", WEAK, pref, base, max_tokens=8, grammar=digits, logit_bias=((7, 5.0),)),
            make_request("alternating", METHODS[0], pref, base, max_tokens=14, grammar=alternating),
            make_request("drawn", METHODS[0], pref, base, max_tokens=12, temperature=1.5, seed=11, grammar=ten_digits),
        ]

    with_tail = graphed_engine(loaded, config, tail=True)
    got = answers(with_tail, batch())
    assert got == answers(graphed_engine(loaded, config, tail=False), batch())
    graphs = with_tail.runner.graphs
    assert graphs is not None and graphs.tail_steps == graphs.steps >= 15
    assert with_tail.overlapped_steps == graphs.steps  # every decode step (the prefill's holds grammars: not)
    assert all("".join(out[0] for out in got[rid]).isdigit() for rid in ("digits", "weak", "drawn"))
    assert re.fullmatch("([0-9][a-z]){6}", "".join(out[0] for out in got["alternating"]))


def test_thinking_spans_are_the_tails_with_the_hosts_answers(tiny_model):
    """A reasoning request's thinking (the preference context alone: A = 1), then the method and a grammar after its
    end token, another's without a grammar or plausibility pass (every log-probability follows A), beside a plain
    request: every decode step is the tail's and overlapped (the thinking's coefficient and
    the grammar made once the step in flight's tokens are read, while the next forward pass runs), and the answers
    are the host path's."""
    loaded = tiny_model("llama")
    config = EngineConfig(**FIELDS, overlap_host=True)
    pref, base = prompts(41, shared=12, pref_extra=5, base_extra=2)
    free = answers(
        graphed_engine(loaded, config, tail=False), [make_request("f", PREF, pref, base, max_tokens=12, ignore_eos=True)]
    )
    thought = tokens(free["f"])
    end = next(k for k in range(3, len(thought)) if thought[k] not in thought[:k])
    span = ThinkingSpan(end_token_id=thought[end], open_at_start=True)
    digits = GrammarSpec(GrammarKind.REGEX, "[0-9]{4}")

    def batch() -> list:
        thinking = make_request("t", AMULET, pref, base, max_tokens=end + 5, logprobs=True, grammar=digits)
        thinking = GenerationRequest.from_contexts("t", thinking.contexts, thinking.sampling, thinking.method, thinking=span)
        free = make_request("free", LOOSE, pref, base, max_tokens=end + 5, logprobs=True, ignore_eos=True)
        free = GenerationRequest.from_contexts("free", free.contexts, free.sampling, free.method, thinking=span)
        return [thinking, free, make_request("plain", STRICT, pref, base, max_tokens=12, ignore_eos=True)]

    with_tail = graphed_engine(loaded, config, tail=True)
    got = answers(with_tail, batch())
    assert got == answers(graphed_engine(loaded, config, tail=False), batch())
    graphs = with_tail.runner.graphs
    assert graphs is not None and graphs.tail_steps == graphs.steps >= 10
    assert with_tail.overlapped_steps == graphs.steps
    assert tokens(got["t"])[: end + 1] == thought[: end + 1]  # the thinking: the preference context's tokens


def tokens(outputs: list) -> list[int]:
    return [t for out in outputs for t in out[1]]


def test_seeded_requests_draw_in_the_tail_the_tokens_the_host_draws(tiny_model):
    """Seeded sampled requests (temperature, min_p, top-k, top-p) draw their seed's counter-based noise: the tail and
    the host path give them the same tokens, bit for bit, and so does a run with other requests beside them."""
    loaded = tiny_model("llama")
    config = EngineConfig(**FIELDS, overlap_host=True)
    pref, base = prompts(38, shared=12, pref_extra=5, base_extra=2)

    def seeded() -> list:
        return [
            make_request("warm", AMULET, pref, base, max_tokens=10, temperature=1.4, seed=11, ignore_eos=True),
            make_request("cut", METHODS[0], pref, base, max_tokens=10, temperature=1.0, min_p=0.05, seed=-5),
            make_request("top", STRICT, pref, base, max_tokens=10, temperature=0.9, top_k=30, top_p=0.9, seed=2**64 - 1),
        ]

    with_tail = graphed_engine(loaded, config, tail=True)
    got = answers(with_tail, seeded())
    graphs = with_tail.runner.graphs
    assert graphs is not None and graphs.tail_steps == graphs.steps >= 9
    assert got == answers(graphed_engine(loaded, config, tail=False), seeded())
    crowded = answers(graphed_engine(loaded, config, tail=True), [*seeded(), *greedy_requests()])
    assert all(tokens(crowded[rid]) == tokens(got[rid]) for rid in got)  # the same draws beside other requests
    reseeded = [dataclasses.replace(r, sampling=dataclasses.replace(r.sampling, seed=12)) for r in seeded()[1:2]]
    assert tokens(answers(graphed_engine(loaded, config, tail=True), reseeded)["cut"]) != tokens(got["cut"])


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


def test_penalties_and_min_tokens_are_the_tails_overlapped_with_the_hosts_answers(tiny_model):
    """Requests with repetition, frequency and presence penalties and with ``min_tokens`` (every method, K = 2 too),
    beside plain ones: every decode step is the tail's and overlapped (the last token counted on the device, where
    it is pending), and the answers are the host path's, bit for bit (the host steps them one by one)."""
    loaded = tiny_model("llama")
    config = EngineConfig(**FIELDS, overlap_host=True)
    pref, base = prompts(36, shared=12, pref_extra=5, base_extra=2)
    eos = int(loaded.tokenizer.eos_token_id)

    def penalised(rid: str, method: MethodSettings, **sampling) -> GenerationRequest:
        return make_request(rid, method, pref, base, max_tokens=12, logprobs=True, **sampling)

    requests = [
        penalised("frequency", AMULET, frequency_penalty=1.5, ignore_eos=True),
        penalised("presence", METHODS[0], presence_penalty=2.0, logit_bias=((eos, 30.0),), min_tokens=6),
        penalised("repetition", STRICT, repetition_penalty=1.8, ignore_eos=True),
        penalised("all", WEAK, repetition_penalty=0.7, frequency_penalty=-0.4, presence_penalty=0.9, ignore_eos=True),
        make("k2", MULTI[0], seed=60, max_tokens=12, frequency_penalty=1.0, min_tokens=4, logprobs=True),
        penalised("plain", METHODS[0], ignore_eos=True),
    ]
    with_tail = graphed_engine(loaded, config, tail=True)
    got = answers(with_tail, requests)
    host = graphed_engine(loaded, config, tail=False)
    assert got == answers(host, requests)
    graphs = with_tail.runner.graphs
    assert graphs is not None and graphs.tail_steps == graphs.steps >= 11
    assert with_tail.overlapped_steps >= graphs.steps and host.overlapped_steps == 0  # the host path: one by one
    presence = [t for out in got["presence"] for t in out[1]]
    assert len(presence) == 7 and presence[-1] == eos  # the end, pushed by the bias, once min_tokens allows it


def test_a_requests_history_counts_the_token_still_pending_on_the_device(tiny_model):
    """While the engine is overlapped, the token of the step in flight is not on the host: the tail's history of the
    request says so (the step's input token is then counted on the device) and ``min_tokens`` counts it."""
    loaded = tiny_model("llama")
    engine = graphed_engine(loaded, EngineConfig(**FIELDS, overlap_host=True), tail=True)
    pref, base = prompts(37, shared=8, pref_extra=3, base_extra=2)
    engine.add_request(make_request("r", AMULET, pref, base, max_tokens=8, frequency_penalty=1.0, min_tokens=3))
    state = engine.requests["r"]
    seen = []
    while engine.has_work() and len(seen) < 6:
        engine.step()
        if "r" in engine.requests:
            history = tail_history(state)
            seen.append((len(history.output_ids), history.pending, bool(history.stop_ids)))
    # after the prefill (its token read at once: the host chose it), each decode step leaves one token in flight,
    # which min_tokens counts: two tokens, then three (the stop ids allowed)
    assert seen[:4] == [(1, False, True), (1, True, True), (2, True, False), (3, True, False)], seen
    assert tail_history(state).output_ids is state.output_ids  # no copy a step
    settled = graphed_engine(loaded, EngineConfig(**FIELDS, overlap_host=False), tail=True)
    settled.add_request(make_request("s", AMULET, pref, base, max_tokens=8, frequency_penalty=1.0, min_tokens=3))
    settled.step()
    settled.step()
    assert not tail_history(settled.requests["s"]).pending  # stepped one by one: every token on the host


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


def test_the_inputs_staged_in_two_host_buffers_give_the_same_answers(tiny_model, monkeypatch):
    """The graphs' and the tail's static inputs set as on a CUDA device (``StagedTensors`` staged: two host buffers in
    turn, one copy a step, a step's rows past its own keeping the values of two steps before; the pending tokens'
    places in the copy too; a grammar's masks in a third), here with plain copies: every kind of row, overlapped where
    it can be, answers as the host path does."""
    staged_init = StagedTensors.__init__
    made: list[StagedTensors] = []

    def always_staged(self, fields, device, staged=None) -> None:
        staged_init(self, fields, device, staged=True)
        made.append(self)

    loaded = tiny_model("llama")
    config = EngineConfig(**FIELDS, overlap_host=True)
    pref, base = prompts(39, shared=12, pref_extra=5, base_extra=2)

    def batch() -> list:
        return [
            *greedy_requests(),
            make_request("seeded", STRICT, pref, base, max_tokens=9, temperature=1.2, top_k=25, seed=3),
            make_request("penalised", WEAK, pref, base, max_tokens=9, frequency_penalty=1.2, min_tokens=4),
            make("k3", MULTI[-1], seed=61, max_tokens=9, logprobs=True),
            make_request("digits", AMULET, pref, base, max_tokens=5, grammar=GrammarSpec(GrammarKind.REGEX, "[0-9]{4}")),
        ]

    host = answers(graphed_engine(loaded, config, tail=False), batch())
    monkeypatch.setattr(StagedTensors, "__init__", always_staged)
    with_tail = graphed_engine(loaded, config, tail=True)
    assert len(made) == 3 and all(staged.staged for staged in made)  # the graphs' inputs, the tail's, its masks
    got = answers(with_tail, batch())
    graphs = with_tail.runner.graphs
    assert graphs is not None and graphs.tail_steps == graphs.steps >= 8
    assert got == host
