"""What each logits processor does, on small hand-made rows (the batched sampler and its per-row oracle)."""

from __future__ import annotations

import math

import pytest
import torch

from amulet_core.sampling.params import SamplingParams
from amulet_core.sampling.processors import RowHistory, apply_processors, process_row
from amulet_core.sampling.sampler import choose_token, make_generator, sample_tokens

CPU = torch.device("cpu")


def row(*logits: float) -> torch.Tensor:
    return torch.log_softmax(torch.tensor([list(logits)]), dim=-1)


def greedy_token(logprobs: torch.Tensor, history: RowHistory | None = None, **params) -> int:
    p = SamplingParams(temperature=0, **params)
    got = sample_tokens(logprobs, [p], [None], [history])[0]
    assert got.error is None
    assert got.token == choose_token(logprobs[0], p, None, history)
    return got.token


def test_logit_bias_moves_the_greedy_choice():
    lp = row(0.0, 5.0, 3.0, 1.0)
    assert greedy_token(lp) == 1
    assert greedy_token(lp, logit_bias=((1, -100.0),)) == 2
    assert greedy_token(lp, logit_bias=((0, 100.0),)) == 0
    assert greedy_token(lp, logit_bias={3: 3.5}) == 1  # 1 + 3.5 < 5
    assert greedy_token(lp, logit_bias={3: 4.5}) == 3  # 1 + 4.5 > 5
    biased = process_row(lp[0], SamplingParams(logit_bias=((3, 2.5),)))
    assert float(biased[3]) == pytest.approx(float(lp[0, 3]) + 2.5)


def test_logit_bias_makes_a_sampled_row_draw_the_token():
    lp = torch.log_softmax(torch.randn(1, 500, generator=torch.Generator().manual_seed(0)), dim=-1)
    p = SamplingParams(temperature=1.0, seed=3, logit_bias=((123, 100.0),))
    gen = make_generator(p)
    assert [sample_tokens(lp, [p], [gen])[0].token for _ in range(20)] == [123] * 20


def test_penalties_on_a_hand_computed_row():
    lp = row(2.0, 1.0, 0.5, 0.0, -1.0)[0]
    history = RowHistory(output_ids=[0, 0, 0, 2], prompt_ids=[1, 4])
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0)
    got = process_row(lp, p, history)
    x = lp.tolist()
    want = [
        x[0] * 2 - (0.25 * 3 + 0.5),  # generated three times (log-probs are negative: multiplied)
        x[1] * 2,  # in the prompt only: the repetition penalty, no presence or frequency
        x[2] * 2 - (0.25 + 0.5),
        x[3],
        x[4] * 2,
    ]
    assert got.tolist() == pytest.approx(want, rel=1e-6)
    batched = apply_processors(lp.unsqueeze(0), [p], [history])[0]
    assert torch.equal(batched, got)
    positive = process_row(torch.tensor([3.0, -3.0]), SamplingParams(repetition_penalty=2.0), RowHistory([0, 1]))
    assert positive.tolist() == [1.5, -6.0]  # vLLM's rule: a positive score is divided


def test_presence_and_frequency_penalties_lower_repeated_tokens():
    lp = row(3.0, 2.5, 0.0, 0.0)
    history = RowHistory(output_ids=[0])
    assert greedy_token(lp, history) == 0
    assert greedy_token(lp, history, presence_penalty=1.0) == 1
    assert greedy_token(lp, history, frequency_penalty=1.0) == 1
    assert greedy_token(lp, history, presence_penalty=-1.0, frequency_penalty=-1.0) == 0
    assert greedy_token(lp, RowHistory(output_ids=[1, 1]), frequency_penalty=0.1) == 0
    # presence and frequency count generated tokens only, the repetition penalty the prompt too
    assert greedy_token(lp, RowHistory(prompt_ids=[0]), presence_penalty=2.0, frequency_penalty=2.0) == 0
    assert greedy_token(lp, RowHistory(prompt_ids=[0]), repetition_penalty=3.0) == 1


def test_min_tokens_rules_out_the_stop_ids_until_enough_tokens():
    lp = row(5.0, 1.0, 0.0, 2.0)
    stop = frozenset({0, 3})
    p = {"min_tokens": 3}
    assert greedy_token(lp, RowHistory(output_ids=[1, 1], stop_ids=stop), **p) == 1
    assert greedy_token(lp, RowHistory(output_ids=[1, 1, 1], stop_ids=stop), **p) == 0
    assert greedy_token(lp, RowHistory(output_ids=[1], stop_ids=frozenset({0, 99})), **p) == 3  # 99: past the vocabulary


def test_min_p_keeps_the_tokens_near_the_top():
    lp = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    p = SamplingParams(temperature=1.0, seed=1, min_p=0.5)
    gen = make_generator(p)
    drawn = {sample_tokens(lp, [p], [gen])[0].token for _ in range(200)}
    assert drawn == {0, 1}  # 0.15 < 0.5 * 0.5
    hot = SamplingParams(temperature=2.0, seed=1, min_p=0.5)  # min_p acts after temperature
    gen = make_generator(hot)
    assert math.sqrt(0.15 / 0.5) > 0.5 > math.sqrt(0.05 / 0.5)
    assert {sample_tokens(lp, [hot], [gen])[0].token for _ in range(300)} == {0, 1, 2}


def test_a_row_with_no_possible_token_fails_alone():
    lp = torch.log_softmax(torch.randn(4, 6, generator=torch.Generator().manual_seed(2)), dim=-1)
    lp[1, 2:] = float("-inf")
    lp[3, 2:] = float("-inf")
    doomed = RowHistory(output_ids=[], stop_ids=frozenset({0, 1}))  # the only possible tokens are stop ids
    params = [
        SamplingParams(temperature=1.0, seed=1),
        SamplingParams(temperature=1.0, seed=2, min_tokens=1),
        SamplingParams(temperature=0),
        SamplingParams(temperature=0, min_tokens=1, presence_penalty=1.0),
    ]
    histories = [None, doomed, None, doomed]
    gens = [make_generator(p) for p in params]
    got = sample_tokens(lp, params, gens, histories)
    assert [r.error is None for r in got] == [True, False, True, False]
    assert got[2].token == int(lp[2].argmax())
    for i in (1, 3):
        with pytest.raises(ValueError):
            choose_token(lp[i], params[i], make_generator(params[i]), histories[i])


def test_rows_without_processing_are_left_alone():
    lp = torch.log_softmax(torch.randn(3, 50, generator=torch.Generator().manual_seed(1)), dim=-1)
    plain = [SamplingParams(), SamplingParams(temperature=0, min_p=0.2)]  # min_p acts after temperature only
    two = lp[:2]
    assert apply_processors(two, plain, None) is two
    mixed = [SamplingParams(), SamplingParams(logit_bias=((7, 5.0),)), SamplingParams(frequency_penalty=1.0)]
    out = apply_processors(lp, mixed, [None, None, RowHistory([3, 3])])
    assert torch.equal(out[0], lp[0])
    assert torch.equal(out[1], process_row(lp[1], mixed[1])) and not torch.equal(out[1], lp[1])
    assert torch.equal(out[2], process_row(lp[2], mixed[2], RowHistory([3, 3]))) and float(out[2, 3]) < float(lp[2, 3])
