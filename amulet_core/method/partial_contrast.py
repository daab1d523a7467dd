"""A contrast context's logits at the plausible tokens only.

With a plausibility mask (``plausibility`` above 0, la's and amulet's default 0.5), a request decodes only tokens
whose anchor probability is at least ``plausibility`` times the most likely one's: a handful of tokens. The
distribution over them, ``log_softmax(zc + A (z0 - zc))`` renormalised over the plausible set, reads the contrast
context's logits ``zc`` at those tokens and nowhere else (a constant of the row cancels in the renormalisation), so
the output layer of a contrast row (on a CPU the largest single product of a step after the decoder layers: 49,152
x 576 products for SmolLM2, its weights streamed from memory once more) can be left undone for every other token.
The engine hands the method a :class:`ContrastHead` for such rows. :func:`plausible_logprobs` then computes each
row's distribution over its plausible tokens alone (one normaliser over them, where the whole-vocabulary path
normalises over the vocabulary, masks, and normalises again: the same distribution up to rounding).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch


class ContrastHead(Protocol):
    """Contrast rows of a step whose logits were not computed, and the output layer that computes them on demand."""

    @property
    def rows(self) -> frozenset[int]:
        """The step's logits rows left undone (their values there must not be read)."""
        ...

    def logits_at(self, row: int, tokens: list[int]) -> torch.Tensor:
        """Row ``row``'s logits at ``tokens``, float32 ``[len(tokens)]``, on the logits' device."""
        ...


def plausible_logprobs(
    anchor: torch.Tensor,
    implausible: torch.Tensor,
    rows: Sequence[int],
    coefficients: Sequence[float],
    head: ContrastHead,
) -> torch.Tensor:
    """``[n, V]`` float32: each row's ``log_softmax(zc + A (z0 - zc))`` over its plausible tokens, -inf elsewhere.

    ``anchor``: ``[n, V]`` the rows' anchor logits ``z0``; ``implausible``: ``[n, V]`` bool, the tokens each row's
    plausibility mask (and grammar) rules out (a row without a mask: none, and its whole row is asked for: correct,
    without the saving); ``rows``: the rows' contrast rows, every one left undone by ``head``;
    ``coefficients``: A of each. A token impossible in either context (-inf, NaN, or +inf for a negative A in the
    mix) is impossible, as in the whole-vocabulary path. Row by row, with that row's operations only (its bits do not
    depend on the other rows).
    """
    out = torch.full(anchor.shape, float("-inf"), dtype=torch.float32, device=anchor.device)
    for p, row in enumerate(rows):
        tokens, index = _plausible(implausible[p])
        contrast = head.logits_at(row, tokens)
        mixed = torch.lerp(contrast, anchor[p].index_select(0, index).float(), coefficients[p])
        mixed = torch.nan_to_num_(mixed, nan=float("-inf"), posinf=float("-inf"), neginf=float("-inf"))
        out[p].index_copy_(0, index, torch.log_softmax(mixed, dim=0))
    return out


def _plausible(implausible: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    """A row's plausible tokens (``[V]`` bool ``implausible`` false), in order: as a list and a long tensor on its
    device. On a CPU through numpy (``torch.nonzero`` took 0.18 ms over SmolLM2's 49,152 tokens, numpy 0.01)."""
    if implausible.device.type == "cpu":
        tokens = np.flatnonzero(~implausible.numpy()).tolist()
        return tokens, torch.tensor(tokens, dtype=torch.long)
    index = (~implausible).nonzero().flatten()
    return index.tolist(), index
