"""``method_logprobs`` on a step mixing requests of 1..K+1 rows, with and without grammar masks: each row
against a straightforward per-row reference (the float64 closed form, then the masks)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from amulet_core.grammar.masks import GrammarMasks
from amulet_core.method.mixture import mixture_logits
from amulet_core.method.reference import combine_weighted
from amulet_core.method.rows import RowSpec, method_logprobs
from amulet_core.method.settings import Method, MethodSettings

VOCAB = 3000

KINDS = [
    MethodSettings(method=Method.BASE),
    MethodSettings(method=Method.PREF),
    MethodSettings(method=Method.PREF, weights=(1.0, 2.0)),
    MethodSettings(method=Method.PREF, weights=(1.0, 1.0, 5.0), plausibility=0.4),  # pref: no plausibility mask
    MethodSettings(method=Method.AMULET),
    MethodSettings(method=Method.AMULET, weights=(2.0, 1.0), plausibility=0.3),
    MethodSettings(method=Method.AMULET, weights=(1.0, 1.0, 1.0, 1.0), plausibility=0.0),
    MethodSettings(method=Method.LA, weights=(3.0, 1.0, 0.5), plausibility=0.5),
    MethodSettings(method=Method.LA, plausibility=0.0),
    MethodSettings(method=Method.AMULET, weights=(1.0, 4.0), strength=0.5, plausibility=0.2),
]


def random_masks(rows: list[int], num_rows: int, seed: int) -> tuple[GrammarMasks, torch.Tensor]:
    """Masks of some rows (each allows about a third of the vocabulary), and the ``[num_rows, V]`` keep matrix."""
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 256, (len(rows), (VOCAB + 7) // 8), generator=g, dtype=torch.int32)
    bits &= torch.randint(0, 256, bits.shape, generator=g, dtype=torch.int32)
    bits = bits.to(torch.uint8)
    masks = GrammarMasks(tuple(rows), torch.tensor(rows, dtype=torch.long), bits, VOCAB)
    keep = torch.ones(num_rows, VOCAB, dtype=torch.bool)
    keep[rows] = ~masks.banned
    return masks, keep


def expected_row(logits: torch.Tensor, spec: RowSpec, keep: torch.Tensor) -> torch.Tensor:
    """The float64 closed form of one request's rows, its plausibility mask from the mixture anchor, the grammar."""
    prefs = [logits[r].double() for r in spec.pref_rows]
    weights = spec.method.weights
    contrast = None if spec.contrast is None else logits[spec.contrast].double()
    mixed = combine_weighted(prefs, weights, contrast, spec.coefficient)
    keep = keep.clone()
    if contrast is not None and spec.method.plausibility > 0:
        l0 = torch.log_softmax(mixture_logits(prefs, weights), dim=-1)
        keep &= l0 >= l0[keep].max() + math.log(spec.method.plausibility)
    return torch.log_softmax(mixed.masked_fill(~keep, -math.inf), dim=-1)


def random_step(seed: int) -> tuple[torch.Tensor, list[RowSpec]]:
    """A shuffled step: each request's rows are consecutive or scattered; contexts perturb a shared one."""
    rng = random.Random(seed)
    kinds = [rng.choice(KINDS) for _ in range(rng.randrange(2, 9))]
    sizes = [s.num_contexts for s in kinds]
    order = list(range(sum(sizes)))
    if rng.random() < 0.5:
        rng.shuffle(order)
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(len(kinds), VOCAB, generator=g) * 3
    logits = torch.empty(sum(sizes), VOCAB)
    specs, at = [], 0
    for i, (settings, size) in enumerate(zip(kinds, sizes, strict=True)):
        rows = order[at : at + size]
        at += size
        for r in rows:
            logits[r] = shared[i] + torch.randn(VOCAB, generator=g)
        k = settings.num_preferences if settings.method is not Method.BASE else 1
        contrast = rows[k] if size > k else None
        specs.append(RowSpec.of(rows[:k], settings.normalized_weights, contrast, settings, settings.effective_strength))
    return logits, specs


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("grammar", [False, True])
def test_mixed_steps_match_the_per_row_reference(seed, grammar):
    logits, specs = random_step(seed)
    n = len(specs)
    constrained = sorted(random.Random(seed).sample(range(n), max(1, n // 2))) if grammar else []
    masks, keep = random_masks(constrained, n, seed) if grammar else (None, torch.ones(n, VOCAB, dtype=torch.bool))
    out = method_logprobs(logits, specs, masks)
    for i, spec in enumerate(specs):
        want = expected_row(logits, spec, keep[i])
        finite = torch.isfinite(want)
        assert torch.equal(torch.isfinite(out[i]), finite), (seed, i)
        torch.testing.assert_close(out[i][finite].double(), want[finite], rtol=0, atol=5e-5)


def test_a_request_gives_the_same_row_whatever_shares_its_step():
    """A K = 2 request alone, and in steps with other layouts: the same float32 numbers."""
    logits, specs = random_step(3)
    several = next(i for i, s in enumerate(specs) if s.extra_rows and s.contrast is not None)
    full = method_logprobs(logits, specs)
    alone = method_logprobs(logits, [specs[several]])
    assert torch.equal(full[several], alone[0])


def test_the_paired_fast_path_is_kept_when_every_request_has_one_preference():
    """Every request a plain two-context one in the alternating layout: the logits are read without copies,
    so an index_select over them never runs (spied), and the numbers equal the general path's."""
    logits, _ = random_step(0)
    settings = MethodSettings(plausibility=0.3)
    specs = [RowSpec.of((2 * i,), (1.0,), 2 * i + 1, settings, settings.effective_strength) for i in range(logits.shape[0] // 2)]
    calls = []
    original = torch.Tensor.index_select

    def spy(self, *args, **kwargs):
        calls.append(self.shape)
        return original(self, *args, **kwargs)

    torch.Tensor.index_select = spy  # type: ignore[method-assign]
    try:
        paired = method_logprobs(logits[: 2 * len(specs)], specs)
    finally:
        torch.Tensor.index_select = original  # type: ignore[method-assign]
    assert not any(shape == (2 * len(specs), VOCAB) for shape in calls)
    shifted = torch.cat([logits[:1], logits[: 2 * len(specs)]])  # one row more in front: the general path
    moved = [RowSpec(s.primary_row + 1, s.contrast + 1, s.method, s.coefficient) for s in specs if s.contrast is not None]
    assert torch.equal(method_logprobs(shifted, moved), paired)
