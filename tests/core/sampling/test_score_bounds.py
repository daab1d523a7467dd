"""The sampling parameters' bounds keep every processed score finite in float32 (issue 27, item 1).

A ``repetition_penalty`` that underflows float32 (1e-45 is a subnormal, 1e-46 is 0 there) divided a score
that ``logit_bias`` had made positive into +inf, and the row's distribution into NaN: the request failed with
a 500. SamplingParams now refuses such factors, and at every corner of the accepted ranges the processors and
the temperature leave finite scores.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from amulet_core.errors import InvalidParameterError
from amulet_core.sampling.params import (
    MAX_ABS_LOGIT_BIAS,
    MAX_ABS_PENALTY,
    MAX_REPETITION_PENALTY,
    MIN_REPETITION_PENALTY,
    MIN_TEMPERATURE,
    SamplingParams,
)
from amulet_core.sampling.processors import RowHistory, process_row

VOCAB = 8


def test_an_underflowing_repetition_penalty_made_scores_infinite() -> None:
    """The failure the bound prevents, in float32 arithmetic as the processors do it."""
    biased = torch.tensor([100.0], dtype=torch.float32)
    assert torch.isinf(biased / torch.tensor(1e-46, dtype=torch.float32)).all()  # 1e-46 is 0 in float32
    assert torch.isinf(biased / torch.tensor(1e-45, dtype=torch.float32)).all()  # a subnormal: overflows


@pytest.mark.parametrize("value", [1e-46, 1e-45, 1e-3, MIN_REPETITION_PENALTY / 2, MAX_REPETITION_PENALTY * 1.01, 1e39, 0, -1])
def test_repetition_penalties_out_of_bounds_are_refused(value: float) -> None:
    with pytest.raises(InvalidParameterError) as refused:
        SamplingParams(repetition_penalty=value, logit_bias={5: 100})
    assert refused.value.param == "repetition_penalty"


def test_every_corner_of_the_accepted_ranges_keeps_scores_finite() -> None:
    """Log-probabilities from 0 down to -1e4 (and -inf), a long history of every token, and each extreme of
    repetition_penalty, logit_bias, presence and frequency penalties, divided by the smallest sampled temperature."""
    logprobs = torch.tensor([0.0, -1e-30, -1.0, -30.0, -1e3, -1e4, float("-inf"), -5.0], dtype=torch.float32)
    history = RowHistory(output_ids=list(range(VOCAB)) * 512, prompt_ids=list(range(VOCAB)))
    corners = itertools.product(
        (MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY),
        (-MAX_ABS_LOGIT_BIAS, MAX_ABS_LOGIT_BIAS),
        (-MAX_ABS_PENALTY, MAX_ABS_PENALTY),
        (-MAX_ABS_PENALTY, MAX_ABS_PENALTY),
    )
    for repetition, bias, presence, frequency in corners:
        params = SamplingParams(
            repetition_penalty=repetition,
            logit_bias={t: bias for t in range(VOCAB)},
            presence_penalty=presence,
            frequency_penalty=frequency,
            temperature=MIN_TEMPERATURE,
        )
        scores = process_row(logprobs, params, history) / params.temperature
        finite = torch.isfinite(scores)
        assert not torch.isnan(scores).any() and not torch.isposinf(scores).any(), (params, scores)
        assert finite[:6].all() and finite[7], (params, scores)  # only the impossible token stays -inf
