"""The closed form's combination of a step's rows, in shapes that do not depend on the step: the fused two-context
mix, amulet's plausibility mask (with the grammar masks folded in), and the whole combination as a captured decode
graph computes it (:func:`fixed_shape_logprobs`). :mod:`amulet_core.method.rows` applies them to a step's requests.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch


class TokenMasks(Protocol):
    """Per-row masks of the tokens some rows may not take next (``grammar.masks.TokenMasks``): the method
    applies them to the distribution it produced, and knows nothing of the grammars behind them."""

    @property
    def index(self) -> torch.Tensor:
        """The masked rows' numbers, a long tensor on the logits' device."""
        ...

    def add_to_(self, scores: torch.Tensor, renormalise: bool = False) -> None:
        """Add 0 (allowed) or -inf (banned) to the masked rows of ``scores``, in place."""
        ...

    def apply_(self, logprobs: torch.Tensor) -> None:
        """Mask the rows in place and renormalise each one."""
        ...

    def restrict(self, rows: Sequence[int]) -> TokenMasks | None:
        """The masks of those of ``rows`` that have one, numbered by their positions in ``rows``."""
        ...

    def without(self, rows: Iterable[int]) -> TokenMasks:
        """These masks less those of ``rows``."""
        ...


def combine_contexts_float32(
    pref_logits: torch.Tensor, contrast_logits: torch.Tensor, coefficients: torch.Tensor
) -> torch.Tensor:
    """``log_softmax(zb + A (z0 - zb))`` per row in float32: one fused ``lerp``, one fix-up, one log_softmax.

    ``coefficients`` is ``[R, 1]`` float32. Where a token is impossible (-inf) in either context the mix
    is -inf or NaN (or +inf for a negative A); all of those become -inf, as in ``combine_contexts``.
    """
    mixed = torch.lerp(contrast_logits.float(), pref_logits.float(), coefficients)
    mixed = torch.nan_to_num_(mixed, nan=float("-inf"), posinf=float("-inf"), neginf=float("-inf"))
    return torch.log_softmax(mixed, dim=-1)


def fixed_shape_logprobs(
    anchor: torch.Tensor,
    contrast: torch.Tensor,
    coefficients: torch.Tensor,
    betas: torch.Tensor,
    renormalise: torch.Tensor | None,
    grammar: FixedMasks | None = None,
) -> torch.Tensor:
    """``method_logprobs`` (:mod:`amulet_core.method.rows`) of the rows of a step, in a shape that does not depend
    on which rows are plain: what a captured decode graph can compute (no host decision, no indexing by a host list).

    ``anchor``: ``[R, V]`` each row's preference anchor (its preference context's logits for K = 1, the float32
    weighted mixture of :func:`~amulet_core.method.mixture.mixture_logits_float32` for K > 1, as ``method_logprobs``
    forms it); ``contrast``: ``[R, V]`` its contrast context's logits. A row without a contrast gives its anchor as
    ``contrast`` with a coefficient of 1, which ``lerp`` returns exactly, so it gets its anchor's log-softmax.
    ``coefficients`` ``[R, 1]`` float32 (A); ``betas`` ``[R]`` float32 (the plausibility; 0 for a row without a
    contrast); ``renormalise`` ``[R]`` bool: the rows with the plausibility pass, which ``method_logprobs`` gives
    every row that is not plain (a contrast, or K > 1) in a step as soon as one row with a contrast has a plausibility
    above 0; None: no row has it (and it is not computed). ``grammar``: the rows' grammar masks, folded into the
    plausibility pass of the rows that have it and applied (added, renormalised) to the others, as
    ``method_logprobs`` does. Row by row the same operations as ``method_logprobs``, so the same bits.
    """
    mixed = combine_contexts_float32(anchor, contrast, coefficients)
    if renormalise is None:
        return mixed if grammar is None else grammar.apply(mixed, None)
    masked = plausibility_mask(mixed.clone(), anchor, betas, grammar)
    out = torch.where(renormalise.unsqueeze(1), masked, mixed)
    return out if grammar is None else grammar.apply(out, renormalise)


@dataclass(frozen=True)
class FixedMasks:
    """Grammar masks of every row of a step in a fixed shape (a decode graph's): ``penalty`` ``[R, V]`` float32, 0 where
    a row's token is allowed and -inf where it is banned, and ``masked`` ``[R, 1]`` bool, the rows that have a mask (the
    others' penalties are never read)."""

    penalty: torch.Tensor
    masked: torch.Tensor

    def add_to_(self, scores: torch.Tensor) -> None:
        """The penalties added to the masked rows of ``scores``, in place (the others unchanged)."""
        scores.copy_(torch.where(self.masked, scores + self.penalty, scores))

    def clamp(self, threshold: torch.Tensor) -> torch.Tensor:
        """The plausibility thresholds of the masked rows at least the lowest float (their banned tokens always go)."""
        return torch.where(self.masked, threshold.clamp_min(torch.finfo(torch.float32).min), threshold)

    def apply(self, logprobs: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        """The masked rows (less ``skip``'s, ``[R]`` bool: their masks are in their plausibility pass) with their
        penalties added and renormalised (``GrammarMasks.apply_``'s arithmetic); the other rows as they are."""
        rows = self.masked if skip is None else self.masked & ~skip.unsqueeze(1)
        return torch.where(rows, torch.log_softmax(logprobs + self.penalty, dim=-1), logprobs)


def plausibility_mask(
    logprobs: torch.Tensor, pref_logits: torch.Tensor, betas: torch.Tensor, allowed: TokenMasks | FixedMasks | None = None
) -> torch.Tensor:
    """``methods.plausibility_mask`` with the same threshold arithmetic, fewer passes (:func:`implausible`): the
    float32 ``logprobs`` masked in place, then renormalised."""
    return torch.log_softmax(logprobs.masked_fill_(implausible(pref_logits, betas, allowed), float("-inf")), dim=-1)


def implausible(pref_logits: torch.Tensor, betas: torch.Tensor, allowed: TokenMasks | FixedMasks | None = None) -> torch.Tensor:
    """The tokens ``methods.plausibility_mask`` rules out, ``[R, V]`` bool; the rows with beta 0 get a threshold of
    -inf instead of a separate mask (nothing ruled out).

    The rows of ``allowed`` also lose their banned tokens, in the same pass: their pref log-probabilities
    are -inf there, so the threshold counts from the most likely allowed token, and a threshold at least
    the lowest float (not -inf, even for beta 0) drops exactly the banned tokens plus the implausible ones.
    """
    l0 = torch.log_softmax(pref_logits.float(), dim=-1)
    if allowed is not None:
        allowed.add_to_(l0)
    threshold = l0.amax(dim=-1, keepdim=True) + torch.log(betas.float().clamp_min(1e-45)).reshape(-1, 1)
    threshold = threshold.masked_fill(betas.reshape(-1, 1) <= 0, float("-inf"))
    if isinstance(allowed, FixedMasks):
        threshold = allowed.clamp(threshold)
    elif allowed is not None:
        lowest = torch.finfo(torch.float32).min
        threshold.index_copy_(0, allowed.index, threshold.index_select(0, allowed.index).clamp_min(lowest))
    return l0 < threshold
