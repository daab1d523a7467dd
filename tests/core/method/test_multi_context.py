"""K weighted preference contexts and one contrast context: the closed form against Algorithm 1 on the
mixture anchor, the weights' normalisation, and the batched float32 path of ``method_logprobs``."""

from __future__ import annotations

import math

import pytest
import torch

from amulet_core.errors import InvalidParameterError
from amulet_core.method.combination import combine_contexts_float32
from amulet_core.method.mixture import MAX_PREFERENCES, mixture_logits
from amulet_core.method.reference import amulet_iterative, combine_weighted
from amulet_core.method.rows import RowSpec, method_logprobs
from amulet_core.method.settings import Method, MethodSettings, combine_contexts
from tests.core.method.test_methods import LARGE_A_SETS, PARAMETER_SETS

WEIGHTS = {2: (1.0, 3.0), 3: (0.5, 2.0, 1.5)}


def _contexts(
    k: int, dtype: torch.dtype, rows: int = 4, vocab: int = 49152, seed: int = 0
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """K preference contexts and a contrast one at a language model's scale, each a perturbation of a shared one."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 2
    prefs = [shared + torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 0.5 for _ in range(k)]
    contrast = shared + torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 0.5
    return [p.to(dtype) for p in prefs], contrast.to(dtype)


def _iterative_on_anchor(prefs: list[torch.Tensor], weights, contrast: torch.Tensor, settings: MethodSettings) -> torch.Tensor:
    """Algorithm 1 in float64 with l0 = log_softmax(sum v_i l_{P_i}) (written out here) and lb = l_C."""
    total = sum(weights)
    anchor = sum((w / total) * torch.log_softmax(p.double(), dim=-1) for w, p in zip(weights, prefs, strict=True))
    return amulet_iterative(anchor, contrast.double(), settings)


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("params", PARAMETER_SETS)
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.float64, 1e-9)])
def test_closed_form_equals_iterative_on_the_mixture(k, params, dtype, tolerance):
    t, eta, alpha, lam = params
    weights = WEIGHTS[k]
    settings = MethodSettings(iterations=t, eta=eta, alpha=alpha, lam=lam, weights=weights)
    prefs, contrast = _contexts(k, dtype)
    iterative = _iterative_on_anchor(prefs, weights, contrast, settings)
    closed = combine_weighted(prefs, weights, contrast, settings.effective_strength)
    assert closed.dtype == dtype
    assert (iterative - closed.double()).abs().max().item() <= tolerance


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("params", PARAMETER_SETS)
def test_the_engines_float32_path_tracks_the_game(k, params):
    """``method_logprobs`` (what the engine decodes from) against the float64 game, as the K = 1 float32
    path is checked against the float64 closed form (``test_float32_combination_matches_the_float64_closed_form``)."""
    t, eta, alpha, lam = params
    weights = WEIGHTS[k]
    settings = MethodSettings(iterations=t, eta=eta, alpha=alpha, lam=lam, weights=weights, plausibility=0.0)
    prefs, contrast = _contexts(k, torch.float32)
    rows = prefs[0].shape[0]
    logits = torch.cat([torch.stack([*(p[r] for p in prefs), contrast[r]]) for r in range(rows)])
    specs = [
        RowSpec.of(
            range(r * (k + 1), r * (k + 1) + k),
            settings.normalized_weights,
            r * (k + 1) + k,
            settings,
            settings.effective_strength,
        )
        for r in range(rows)
    ]
    fast = method_logprobs(logits, specs)
    iterative = _iterative_on_anchor(prefs, weights, contrast, settings)
    assert (iterative - fast.double()).abs().max().item() <= 3e-5
    assert torch.equal(fast.argmax(-1), iterative.argmax(-1))


@pytest.mark.parametrize("params", LARGE_A_SETS)
def test_large_coefficient_on_the_mixture(params):
    t, eta, alpha, lam = params
    settings = MethodSettings(iterations=t, eta=eta, alpha=alpha, lam=lam, weights=(2.0, 1.0))
    assert settings.effective_strength > 100
    prefs, contrast = _contexts(2, torch.float64)
    iterative = _iterative_on_anchor(prefs, settings.weights, contrast, settings)
    closed = combine_weighted(prefs, settings.weights, contrast, settings.effective_strength)
    scale = iterative.abs().max().item()
    assert (iterative - closed).abs().max().item() <= 1e-12 * scale
    closed32 = combine_weighted([p.float() for p in prefs], settings.weights, contrast.float(), settings.effective_strength)
    assert torch.isfinite(closed32.logsumexp(-1)).all()
    assert torch.equal(iterative.argmax(-1), closed32.argmax(-1))


def test_one_preference_is_todays_closed_form_exactly():
    prefs, contrast = _contexts(1, torch.float32)
    for weights in ((), (1.0,), (7.5,)):
        got = combine_weighted(prefs, weights, contrast, 5.6487)
        assert torch.equal(got, combine_contexts(prefs[0], contrast, [5.6487] * 4))
    logits = torch.stack([prefs[0][0], contrast[0], prefs[0][1], contrast[1]])
    on = MethodSettings(plausibility=0.3)
    specs = [RowSpec.of((0,), on.normalized_weights, 1, on, 4.0), RowSpec(3, 2, on, 2.0)]  # not the paired layout
    expected = combine_contexts_float32(logits[[0, 3]], logits[[1, 2]], torch.tensor([[4.0], [2.0]]))
    l0 = torch.log_softmax(logits[[0, 3]], dim=-1)
    expected = torch.log_softmax(expected.masked_fill(l0 < l0.max(-1, keepdim=True).values + math.log(0.3), -math.inf), -1)
    assert torch.equal(method_logprobs(logits, specs), expected)


def test_equal_weights_give_the_same_distribution_whatever_their_scale():
    prefs, contrast = _contexts(3, torch.float32)
    one = combine_weighted(prefs, (1, 1, 1), contrast, 3.0)
    assert torch.equal(one, combine_weighted(prefs, (2, 2, 2), contrast, 3.0))
    a, b = MethodSettings(weights=(1, 1)), MethodSettings(weights=(2, 2))
    assert a.normalized_weights == b.normalized_weights == (0.5, 0.5)
    logits = torch.stack([prefs[0][0], prefs[1][0], contrast[0]])
    got = [method_logprobs(logits, [RowSpec.of((0, 1), s.normalized_weights, 2, s, s.effective_strength)]) for s in (a, b)]
    assert torch.equal(got[0], got[1])


def test_a_dominant_weight_approaches_that_preference_alone():
    prefs, contrast = _contexts(2, torch.float64)
    alone = combine_contexts(prefs[0], contrast, [5.6487] * 4)
    distances = [(combine_weighted(prefs, (w, 1.0), contrast, 5.6487) - alone).abs().max().item() for w in (1, 10, 1000)]
    assert distances[0] > distances[1] > distances[2]
    assert distances[2] < distances[0] / 200 and distances[2] < 0.05
    assert torch.equal(combine_weighted(prefs, (1000, 1), contrast, 5.6487).argmax(-1), alone.argmax(-1))


def test_pref_with_several_preferences_is_the_product_of_experts():
    prefs, _ = _contexts(2, torch.float64)
    expected = torch.log_softmax(0.25 * torch.log_softmax(prefs[0], -1) + 0.75 * torch.log_softmax(prefs[1], -1), -1)
    assert torch.allclose(combine_weighted(prefs, (1, 3), None, None), expected, atol=1e-12)
    assert torch.allclose(torch.log_softmax(mixture_logits(prefs, (1, 3)), -1), expected, atol=1e-12)


def test_impossible_tokens_stay_impossible_in_every_path():
    prefs, contrast = _contexts(2, torch.float32, rows=1, vocab=32)
    prefs[0][0, 3] = -math.inf
    prefs[1][0, 4] = -math.inf
    contrast[0, 5] = -math.inf
    prefs[0][0, 6] = prefs[1][0, 6] = -math.inf
    settings = MethodSettings(weights=(1, 2), plausibility=0.0)
    slow = combine_weighted(prefs, (1, 2), contrast, 5.0)
    logits = torch.cat([prefs[0], prefs[1], contrast])
    fast = method_logprobs(logits, [RowSpec.of((0, 1), settings.normalized_weights, 2, settings, 5.0)])
    pref = MethodSettings(method=Method.PREF, weights=(1, 2))
    fast_pref = method_logprobs(logits, [RowSpec.of((0, 1), pref.normalized_weights, None, pref, None)])
    for out in (slow, fast):
        assert torch.isneginf(out[0, [3, 4, 5, 6]]).all() and torch.isfinite(out[0, [0, 1, 2, 7]]).all()
    assert torch.isneginf(fast_pref[0, [3, 4, 6]]).all() and torch.isfinite(fast_pref[0, [0, 5, 7]]).all()


@pytest.mark.parametrize(
    ("weights", "message"),
    [((0,), "above 0"), ((1, -2), "above 0"), ((1, math.nan), "above 0"), ((math.inf,), "above 0"), ((True,), "above 0")]
    + [(("1",), "above 0"), ("12", "list"), (3, "list"), ((1,) * (MAX_PREFERENCES + 1), "at most"), ((10**400,), "above 0")],
)
def test_invalid_weights_name_the_field(weights, message):
    with pytest.raises(InvalidParameterError) as info:
        MethodSettings(weights=weights)
    assert info.value.param == "weights" and "weights" in str(info.value) and message in str(info.value)


def test_settings_count_their_contexts():
    assert MethodSettings().num_contexts == 2 and MethodSettings().num_preferences == 1
    assert MethodSettings(weights=[1, 2, 3]).weights == (1.0, 2.0, 3.0)  # a JSON list becomes a tuple
    assert MethodSettings(weights=(1, 2, 3)).num_contexts == 4
    assert MethodSettings(method=Method.LA, weights=(1, 2)).num_contexts == 3
    assert MethodSettings(method=Method.PREF, weights=(1, 2)).num_contexts == 2
    assert MethodSettings(method=Method.PREF).num_contexts == 1
    assert MethodSettings(method=Method.BASE).num_contexts == 1
    assert MethodSettings(weights=(1, 3)).normalized_weights == (0.25, 0.75)
    assert MethodSettings.from_fields({"weights": [2, 2], "strength": 3.0}).normalized_weights == (0.5, 0.5)
    assert MethodSettings.from_fields({"weights": None}).weights == ()
    big = MethodSettings(weights=(1e308, 1e308)).normalized_weights
    assert big == (0.5, 0.5)
