"""The 4-bit groups of a linear layer's weight: per group of :data:`GROUP` inputs, codes in 0..15, a step and a lowest
value, recovered exactly from a weight that is already 4-bit (a Q4_0, Q4_1 or Q4_K GGUF model's, dequantized by
transformers) or rounded from any other (:mod:`amulet_core.model.quantization`'s int4 layers)."""

from __future__ import annotations

import torch
from torch import nn

GROUP = 32
"""Inputs per int4 group (GGUF's Q4_0 and Q4_1 blocks)."""

LEVEL_TOLERANCE = 0.25
"""Most distance, in steps, of a weight from its group's nearest level for a layer to count as already 4-bit."""


def four_bit_codes(weight: torch.Tensor, exact_only: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(codes ``[out, in]`` int32 in 0..15, steps and lowest values ``[out, in / GROUP]`` float32) of a weight, in
    groups of :data:`GROUP` inputs from each group's lowest to its highest value. With ``exact_only``, None unless
    every weight already lies within :data:`LEVEL_TOLERANCE` of a level (a 4-bit weight: a Q4_0/Q4_1 GGUF's, whose
    groups span 16 levels, or a Q4_K one's, whose step is :func:`smallest_gap`); None for a shape that does not
    split into groups."""
    if weight.dim() != 2 or weight.shape[1] % GROUP or weight.numel() == 0:
        return None
    out_features, in_features = weight.shape
    groups = weight.detach().float().view(out_features, in_features // GROUP, GROUP)
    lowest = groups.amin(-1)
    step = (groups.amax(-1) - lowest) / 15
    safe = torch.where(step > 0, step, torch.ones_like(step)).unsqueeze(-1)
    levels = (groups - lowest.unsqueeze(-1)) / safe
    if not bool(torch.isfinite(levels).all()):
        return None
    codes = levels.round()
    if exact_only:
        off = (levels - codes).abs().amax(-1) > LEVEL_TOLERANCE  # groups not on 16 levels from lowest to highest
        if bool(off.any()):
            step = step.clone()
            step[off] = smallest_gap(groups[off])
            if not bool(torch.isfinite(step).all()):  # a group on no grid of at most 16 levels
                return None
            levels = (groups - lowest.unsqueeze(-1)) / torch.where(step > 0, step, torch.ones_like(step)).unsqueeze(-1)
            codes = levels.round()
            if not bool(torch.isfinite(levels).all()):
                return None
        if float((levels - codes).abs().max()) > LEVEL_TOLERANCE:
            return None
    return codes.clamp_(0, 15).to(torch.int32).view(out_features, in_features), step, lowest


def smallest_gap(groups: torch.Tensor) -> torch.Tensor:
    """Per group (last dimension), the largest step that puts every value of the group on a level: its range over
    the fewest whole steps (1 to 15) for which every value lies within :data:`LEVEL_TOLERANCE` of a level, or NaN
    for none. The step of a 4-bit group whose codes do not reach both 0 and 15 (a GGUF Q4_K sub-block's:
    ``d * scale * q - dmin * min``); trying whole numbers of steps, rather than measuring one gap, keeps a bfloat16
    rounding of the values from growing with the codes."""
    lowest = groups.amin(-1, keepdim=True)
    span = groups.amax(-1) - lowest.squeeze(-1)
    step = torch.full_like(span, float("nan"))
    for count in range(15, 0, -1):  # the fewest steps that fit win: they are tried last
        candidate = span / count
        levels = (groups - lowest) / torch.where(candidate > 0, candidate, torch.ones_like(candidate)).unsqueeze(-1)
        fits = (levels - levels.round()).abs().amax(-1) <= LEVEL_TOLERANCE
        step = torch.where(fits, candidate, step)
    return step


def layer_codes(layer: nn.Linear, exact_only: bool) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], bool] | None:
    """(:func:`four_bit_codes` of a linear layer's weight, whether it was already 4-bit), or None where it does not
    split into groups (or, with ``exact_only``, is not 4-bit)."""
    found = four_bit_codes(layer.weight, exact_only=True)
    exact = found is not None
    if found is None and not exact_only:
        found = four_bit_codes(layer.weight, exact_only=False)
    return None if found is None else (found, exact)
