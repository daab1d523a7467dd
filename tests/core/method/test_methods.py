"""The closed form equals the paper's iterative game; la matches its formula; parameters validate."""

from __future__ import annotations

import math

import pytest
import torch

from amulet_core.errors import InvalidParameterError
from amulet_core.method.reference import amulet_iterative
from amulet_core.method.settings import (
    MAX_ITERATIONS,
    Method,
    MethodSettings,
    amulet_coefficient,
    combine_contexts,
    linear_alignment,
    plausibility_mask,
)

# Points of the paper's grid (T, eta, alpha, lambda) where A stays moderate (alpha <= lambda or T small).
PARAMETER_SETS = [
    (0, 10, 2, 2),
    (20, 10, 2, 2),
    (60, 10, 2, 2),
    (100, 10, 2, 2),
    (60, 2, 1, 10),
    (60, 20, 10, 10),
    (20, 20, 1, 1),
    (100, 2, 2, 10),
]
# alpha > lambda: A grows into the hundreds or far beyond.
LARGE_A_SETS = [(40, 10, 10, 2), (100, 2, 2, 1), (60, 10, 2, 1)]


def _logits(dtype: torch.dtype, rows: int = 4, vocab: int = 49152, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at a language model's scale (std 2), the base context a perturbation of the pref one."""
    g = torch.Generator().manual_seed(seed)
    pref = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 2
    base = pref + torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 0.5
    return pref.to(dtype), base.to(dtype)


@pytest.mark.parametrize("params", PARAMETER_SETS)
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.float64, 1e-9)])
def test_closed_form_equals_iterative(params, dtype, tolerance):
    """Max abs difference of log-probs. The oracle plays the game in float64 on the same logits:
    run in float32, the 60-step loop itself drifts by ~1.5e-5 from exact, the closed form by ~4e-6."""
    t, eta, alpha, lam = params
    settings = MethodSettings(iterations=t, eta=eta, alpha=alpha, lam=lam)
    pref, base = _logits(dtype)
    iterative = amulet_iterative(pref.double(), base.double(), settings)
    closed = combine_contexts(pref, base, [settings.effective_strength] * pref.shape[0])
    assert closed.dtype == dtype
    assert (iterative - closed.double()).abs().max().item() <= tolerance


@pytest.mark.parametrize("params", PARAMETER_SETS)
def test_closed_form_tracks_the_float32_loop(params):
    t, eta, alpha, lam = params
    settings = MethodSettings(iterations=t, eta=eta, alpha=alpha, lam=lam)
    pref, base = _logits(torch.float32)
    loop32 = amulet_iterative(pref, base, settings)
    closed = combine_contexts(pref, base, [settings.effective_strength] * pref.shape[0])
    assert (loop32 - closed).abs().max().item() <= 5e-5
    assert torch.equal(loop32.argmax(-1), closed.argmax(-1))


@pytest.mark.parametrize("params", LARGE_A_SETS)
def test_closed_form_with_large_coefficient(params):
    """Log-probs reach -1e5 and beyond here, so the tolerance is relative to their scale."""
    t, eta, alpha, lam = params
    settings = MethodSettings(iterations=t, eta=eta, alpha=alpha, lam=lam)
    assert settings.effective_strength > 100
    pref, base = _logits(torch.float64)
    iterative = amulet_iterative(pref, base, settings)
    closed = combine_contexts(pref, base, [settings.effective_strength] * pref.shape[0])
    scale = iterative.abs().max().item()
    assert (iterative - closed).abs().max().item() <= 1e-12 * scale
    closed32 = combine_contexts(pref.float(), base.float(), [settings.effective_strength] * pref.shape[0])
    assert (iterative - closed32.double()).abs().max().item() <= 1e-6 * scale
    assert torch.equal(iterative.argmax(-1), closed32.argmax(-1))


def test_paper_default_coefficient():
    assert abs(amulet_coefficient(60, 10, 2, 2) - 5.6487) <= 1e-4
    assert abs(MethodSettings().effective_strength - 5.6487) <= 1e-4
    assert abs(amulet_coefficient(20, 10, 2, 2) - 4.5665) <= 1e-4
    assert abs(amulet_coefficient(60, 20, 1, 10) - 1.1108) <= 1e-4


def test_zero_iterations_is_pure_pref():
    pref, base = _logits(torch.float64)
    settings = MethodSettings(iterations=0)
    assert settings.effective_strength == 1.0
    out = combine_contexts(pref, base, [settings.effective_strength] * 4)
    assert torch.allclose(out, torch.log_softmax(pref, dim=-1), atol=1e-12)


def test_linear_alignment_matches_formula():
    pref, base = _logits(torch.float64)
    settings = MethodSettings(method=Method.LA, ratio=2.0)
    expected = torch.log_softmax(pref + 2.0 * (pref - base), dim=-1)
    assert torch.allclose(linear_alignment(pref, base, 2.0), expected, atol=1e-12)
    closed = combine_contexts(pref, base, [settings.effective_strength] * 4)
    assert (closed - expected).abs().max().item() <= 1e-9


def test_rows_use_their_own_coefficient():
    pref, base = _logits(torch.float64, rows=3)
    coefs = [1.0, 3.0, amulet_coefficient(60, 10, 2, 2)]
    batched = combine_contexts(pref, base, coefs)
    for i, a in enumerate(coefs):
        alone = combine_contexts(pref[i : i + 1], base[i : i + 1], [a])
        assert torch.allclose(batched[i], alone[0], atol=1e-12)


def test_huge_coefficient_stays_finite_and_agrees_with_iterative():
    settings = MethodSettings(iterations=60, eta=4, alpha=5, lam=1)
    a = settings.effective_strength
    assert a > 1e5
    pref, base = _logits(torch.float32)
    closed = combine_contexts(pref, base, [a] * 4)
    assert torch.isfinite(closed).all()
    assert torch.equal(closed.argmax(-1), amulet_iterative(pref.double(), base.double(), settings).argmax(-1))
    # Beyond float64's range the coefficient is clamped, and the result is still a distribution.
    extreme = MethodSettings(iterations=MAX_ITERATIONS, eta=0.01, alpha=100, lam=0.01).effective_strength
    assert math.isfinite(extreme)
    out = combine_contexts(pref, base, [extreme] * 4)
    assert torch.isfinite(out.logsumexp(-1)).all()
    assert torch.allclose(out.exp().sum(-1), torch.ones(4), atol=1e-4)


def test_impossible_tokens_stay_impossible():
    pref, base = _logits(torch.float32, rows=1, vocab=16)
    pref[0, 3] = float("-inf")
    base[0, 5] = float("-inf")
    out = combine_contexts(pref, base, [5.0])
    assert torch.isneginf(out[0, 3]) and torch.isneginf(out[0, 5])
    assert torch.isfinite(out[0, [0, 1, 2, 4, 6]]).all()


def test_plausibility_mask_keeps_only_plausible_tokens():
    pref = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    mixed = torch.log_softmax(torch.tensor([[0.0, 0.0, 0.0, 10.0]]), dim=-1)
    out = plausibility_mask(mixed, pref, torch.tensor([0.4]))
    assert torch.isneginf(out[0, 3]) and torch.isneginf(out[0, 2])
    assert torch.isfinite(out[0, :2]).all()
    unchanged = plausibility_mask(mixed, pref, torch.tensor([0.0]))
    assert torch.allclose(unchanged, mixed)


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"iterations": -1}, "iterations"),
        ({"iterations": MAX_ITERATIONS + 1}, "iterations"),
        ({"iterations": 2.5}, "iterations"),
        ({"eta": 0}, "eta"),
        ({"eta": float("nan")}, "eta"),
        ({"alpha": -1}, "alpha"),
        ({"alpha": float("inf")}, "alpha"),
        ({"lam": 0}, "lambda"),
        ({"lam": -2}, "lambda"),
        ({"ratio": -1}, "ratio"),
        ({"plausibility": 1.5}, "plausibility"),
        ({"method": "beam"}, "method"),
        ({"eta": "10"}, "eta"),
    ],
)
def test_invalid_parameters_raise_clear_errors(kwargs, param):
    with pytest.raises(InvalidParameterError) as info:
        MethodSettings(**kwargs)
    assert info.value.param == param
    assert param in str(info.value)
