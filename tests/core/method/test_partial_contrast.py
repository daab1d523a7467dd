"""Contrast rows left undone (``amulet_core.method.partial_contrast``): ``method_logprobs`` given a ``ContrastHead``
for some contrast rows reads their logits at the requests' plausible tokens only, and gives every row the per-row
float64 reference's distribution (the same tokens possible, the same numbers to rounding), with and without grammar
masks, in steps mixing every kind of request; a row's numbers do not depend on what else the step holds."""

from __future__ import annotations

import math
import random

import pytest
import torch

from amulet_core.method.mixture import mixture_logits
from amulet_core.method.rows import RowSpec, method_logprobs
from amulet_core.method.settings import MethodSettings
from tests.core.method.test_multi_context_rows import VOCAB, expected_row, random_masks, random_step


class TableHead:
    """A ContrastHead over known logits: the undone rows' values come from ``table`` (the step's logits before their
    rows were poisoned); every request for tokens is recorded."""

    def __init__(self, table: torch.Tensor, rows: set[int]) -> None:
        self.table = table
        self._rows = frozenset(rows)
        self.asked: dict[int, list[list[int]]] = {}

    @property
    def rows(self) -> frozenset[int]:
        return self._rows

    def logits_at(self, row: int, tokens: list[int]) -> torch.Tensor:
        assert row in self._rows, row
        self.asked.setdefault(row, []).append(list(tokens))
        return self.table[row, tokens].clone()


def undone_step(seed: int, with_zero_betas: bool) -> tuple[torch.Tensor, list[RowSpec], TableHead, torch.Tensor]:
    """A random mixed step whose contrast rows (those with a plausibility mask, or all) are left undone: the logits
    given to the method hold NaN there, the head the real values."""
    logits, specs = random_step(seed)
    rows = {s.contrast for s in specs if s.contrast is not None and (with_zero_betas or s.method.plausibility > 0)}
    head = TableHead(logits, {r for r in rows if r is not None})
    poisoned = logits.clone()
    poisoned[sorted(head.rows)] = float("nan")
    return poisoned, specs, head, logits


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("grammar", [False, True])
@pytest.mark.parametrize("with_zero_betas", [False, True])
def test_undone_contrast_rows_give_the_per_row_reference(seed, grammar, with_zero_betas):
    poisoned, specs, head, logits = undone_step(seed, with_zero_betas)
    n = len(specs)
    constrained = sorted(random.Random(seed).sample(range(n), max(1, n // 2))) if grammar else []
    masks, keep = random_masks(constrained, n, seed) if grammar else (None, torch.ones(n, VOCAB, dtype=torch.bool))
    out = method_logprobs(poisoned, specs, masks, head)
    assert not out.isnan().any()
    for i, spec in enumerate(specs):
        want = expected_row(logits, spec, keep[i])
        finite = torch.isfinite(want)
        assert torch.equal(torch.isfinite(out[i]), finite), (seed, i)
        torch.testing.assert_close(out[i][finite].double(), want[finite], rtol=0, atol=5e-5)


@pytest.mark.parametrize("seed", range(4))
def test_only_the_plausible_tokens_are_read(seed):
    """Each undone row is asked once, for exactly its request's plausible tokens (the reference's), in order."""
    poisoned, specs, head, logits = undone_step(seed, with_zero_betas=False)
    method_logprobs(poisoned, specs, None, head)
    assert set(head.asked) == set(head.rows)
    for spec in specs:
        if spec.contrast not in head.rows:
            continue
        prefs = [logits[r].double() for r in spec.pref_rows]
        l0 = torch.log_softmax(mixture_logits(prefs, spec.method.weights), dim=-1)
        plausible = (l0 >= l0.max() + math.log(spec.method.plausibility)).nonzero().flatten().tolist()
        assert head.asked[spec.contrast] == [plausible]
        assert len(plausible) < VOCAB // 10  # a handful, not the vocabulary


def test_an_undone_row_has_the_same_bits_whatever_shares_its_step():
    """An amulet request alone, and in mixed steps (undone rows and whole rows, grammar or not): the same numbers."""
    poisoned, specs, head, _ = undone_step(5, with_zero_betas=False)
    target = next(i for i, s in enumerate(specs) if s.contrast in head.rows)
    alone = method_logprobs(poisoned, [specs[target]], None, head)
    together = method_logprobs(poisoned, specs, None, head)
    masks, _ = random_masks([j for j in range(len(specs)) if j != target], len(specs), 5)
    constrained_others = method_logprobs(poisoned, specs, masks, head)
    assert torch.equal(together[target], alone[0]) and torch.equal(constrained_others[target], alone[0])


def test_the_paired_layout_with_every_contrast_undone_matches_the_whole_rows():
    """The engine's layout of amulet-only steps (preference and contrast rows alternating), every contrast undone:
    the same tokens possible as with the whole rows, the numbers to rounding, and the contrast rows never read."""
    g = torch.Generator().manual_seed(7)
    shared = torch.randn(4, VOCAB, generator=g) * 3
    logits = (shared.repeat_interleave(2, dim=0) + torch.randn(8, VOCAB, generator=g)).contiguous()
    settings = MethodSettings(plausibility=0.1)
    specs = [RowSpec.of((2 * i,), (1.0,), 2 * i + 1, settings, settings.effective_strength) for i in range(4)]
    head = TableHead(logits, {1, 3, 5, 7})
    poisoned = logits.clone()
    poisoned[1::2] = float("nan")
    whole = method_logprobs(logits, specs)
    undone = method_logprobs(poisoned, specs, None, head)
    assert torch.equal(torch.isfinite(whole), torch.isfinite(undone))
    finite = torch.isfinite(whole)
    torch.testing.assert_close(undone[finite], whole[finite], rtol=0, atol=2e-5)
