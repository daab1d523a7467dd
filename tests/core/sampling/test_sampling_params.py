"""SamplingParams' OpenAI/vLLM sampling set: validation naming the field, the processing flags, ``for_choice``."""

from __future__ import annotations

import pytest

from amulet_core.errors import InvalidParameterError
from amulet_core.sampling.params import MAX_LOGIT_BIAS, MAX_STOP_TOKEN_IDS, SEED_MAX, SEED_MIN, SamplingParams
from amulet_core.sampling.sampler import make_generator
from amulet_core.sampling.seeded import SeededDraws


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("presence_penalty", 2.5),
        ("presence_penalty", -2.01),
        ("presence_penalty", float("nan")),
        ("presence_penalty", True),
        ("frequency_penalty", -3),
        ("frequency_penalty", float("inf")),
        ("frequency_penalty", "1"),
        ("repetition_penalty", 0),
        ("repetition_penalty", -1.0),
        ("repetition_penalty", float("inf")),
        ("min_p", -0.1),
        ("min_p", 1.5),
        ("min_tokens", -1),
        ("min_tokens", 1.5),
        ("min_tokens", True),
        ("logit_bias", ((5, 101.0),)),
        ("logit_bias", ((5, float("nan")),)),
        ("logit_bias", ((-1, 1.0),)),
        ("logit_bias", (("5", 1.0),)),
        ("logit_bias", ((5, 1.0), (5, 2.0))),
        ("logit_bias", ((5, 1.0, 2.0),)),
        ("logit_bias", 7),
        ("logit_bias", tuple((i, 1.0) for i in range(MAX_LOGIT_BIAS + 1))),
        ("stop_token_ids", (-1,)),
        ("stop_token_ids", (1.0,)),
        ("stop_token_ids", tuple(range(MAX_STOP_TOKEN_IDS + 1))),
        ("seed", SEED_MAX + 1),
        ("seed", SEED_MIN - 1),
    ],
)
def test_invalid_values_name_their_field(field, value):
    with pytest.raises(InvalidParameterError) as caught:
        SamplingParams(**{field: value})
    assert caught.value.param == field
    assert field in caught.value.message


def test_min_tokens_may_not_exceed_max_tokens():
    assert SamplingParams(max_tokens=5, min_tokens=5).min_tokens == 5
    with pytest.raises(InvalidParameterError) as caught:
        SamplingParams(max_tokens=5, min_tokens=6)
    assert caught.value.param == "min_tokens"
    assert SamplingParams(min_tokens=10_000).min_tokens == 10_000  # no max_tokens: the context's room decides


def test_the_edges_of_the_ranges_are_valid_and_logit_bias_is_stored_as_pairs():
    p = SamplingParams(
        presence_penalty=-2,
        frequency_penalty=2,
        repetition_penalty=100.0,
        min_p=1,
        logit_bias={3: -100, 9: 100.0},
        seed=SEED_MIN,
        skip_special_tokens=False,
    )
    assert p.logit_bias == ((3, -100.0), (9, 100.0))
    assert SamplingParams(logit_bias=[(3, 1)]).logit_bias == ((3, 1.0),)
    assert hash(p) == hash(SamplingParams(**{**p.__dict__}))


def test_defaults_need_no_processing_and_each_processor_does():
    plain = SamplingParams()
    assert (plain.presence_penalty, plain.frequency_penalty, plain.repetition_penalty) == (0.0, 0.0, 1.0)
    assert (plain.min_p, plain.logit_bias, plain.min_tokens, plain.skip_special_tokens) == (0.0, (), 0, True)
    assert not plain.needs_processing and not plain.needs_history
    for kw in ({"presence_penalty": 0.1}, {"frequency_penalty": -0.1}, {"repetition_penalty": 1.1}, {"min_tokens": 1}):
        p = SamplingParams(**kw)
        assert p.needs_processing and p.needs_history
    for kw in ({"min_p": 0.1}, {"logit_bias": ((1, 1.0),)}):
        p = SamplingParams(**kw)
        assert p.needs_processing and not p.needs_history


def test_for_choice_offsets_the_seed_and_keeps_everything_else():
    p = SamplingParams(temperature=0.7, top_p=0.9, seed=41, presence_penalty=0.5, logit_bias=((1, 2.0),))
    assert p.for_choice(0) == p
    third = p.for_choice(2)
    assert third.seed == 43 and third == SamplingParams(**{**p.__dict__, "seed": 43})
    unseeded = SamplingParams(temperature=0.7)
    assert unseeded.for_choice(3) == unseeded
    assert SamplingParams(seed=-5).for_choice(2).seed == -3
    with pytest.raises(ValueError):
        p.for_choice(-1)


def test_for_choice_wraps_past_the_largest_seed_as_the_draws_read_seeds():
    p = SamplingParams(temperature=1.0, seed=SEED_MAX - 1)
    assert p.for_choice(1).seed == SEED_MAX
    wrapped = p.for_choice(3)
    assert wrapped.seed == 1 and SEED_MIN <= wrapped.seed <= SEED_MAX
    draws = make_generator(wrapped)
    assert draws is not None and draws.halves == SeededDraws(1 + 2**64).halves == (1, 0)  # seeds modulo 2**64
    assert SeededDraws(-1).halves == SeededDraws(SEED_MAX).halves == (2**32 - 1, 2**32 - 1)
