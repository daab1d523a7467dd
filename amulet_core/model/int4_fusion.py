"""Int4 linear layers of the same input computed as one: a decoder's query, key and value projections, its MLP's gate
and up projections.

torch's int4 CPU kernel computes every output column alone (its bits do not depend on the other columns: measured,
and checked by ``tests/engine/test_packed_forward.py`` against the separate layers), and it packs the codes in blocks
of :data:`PACK_BLOCK` output rows, so the codes of layers whose outputs fill whole blocks (all but the last layer)
concatenated are the fused layer's codes. A fusion is checked once on a probe input before it is used. One call instead
of two or three saves the kernel's fixed cost and a module call (one row of SmolLM2's shapes, microbenchmarked:
query, key and value 41.7 us fused against 49.9 us apart; gate and up 119 against 127).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from amulet_core.model.q4_linear import Q4Linear, fuse_q4
from amulet_core.model.quantization import Int4Linear

PACK_BLOCK = 64
"""Output rows per block of the kernel's packed codes."""


def fuse_int4(layers: Sequence[nn.Module]) -> Int4Linear | Q4Linear | None:
    """One :class:`Int4Linear` whose outputs are ``layers``' outputs side by side (in that order), or None unless
    they are all int4 layers of the same inputs and groups (with biases on all or none). The layers' packed codes
    become views of the fused layer's (one copy of the codes); their scales are copied (an eighth of the codes'
    bytes), so each layer still computes alone what it did. ``int4-q16`` layers (:class:`Q4Linear`) are fused by
    :func:`~amulet_core.model.q4_linear.fuse_q4`."""
    if len(layers) >= 2 and all(isinstance(layer, Q4Linear) for layer in layers):
        return fuse_q4([layer for layer in layers if isinstance(layer, Q4Linear)])
    if len(layers) < 2 or not all(isinstance(layer, Int4Linear) for layer in layers):
        return None
    int4 = [layer for layer in layers if isinstance(layer, Int4Linear)]
    first = int4[0]
    for layer in int4:
        same_inputs = layer.in_features == first.in_features and layer.group == first.group
        rows = layer.packed.dim() == 2 and layer.packed.shape[0] == layer.out_features
        whole = layer is int4[-1] or layer.out_features % PACK_BLOCK == 0
        if not (same_inputs and rows and whole and layer.packed.dtype == first.packed.dtype and layer.packed.is_contiguous()):
            return None
    biases = [layer.bias for layer in int4]
    if any(b is None for b in biases) and not all(b is None for b in biases):
        return None
    packed = torch.cat([layer.packed for layer in int4])
    scales = torch.cat([layer.scales_and_zeros for layer in int4], dim=1).contiguous()
    bias = None if biases[0] is None else torch.cat([b.detach() for b in biases if b is not None])
    outputs = sum(layer.out_features for layer in int4)
    fused = Int4Linear(packed, scales, torch.Size((outputs, first.in_features)), bias, first.group)
    probe = torch.randn(3, first.in_features, generator=torch.Generator().manual_seed(0)).to(first.scales_and_zeros.dtype)
    with torch.inference_mode():
        if not torch.equal(fused(probe), torch.cat([layer(probe) for layer in int4], dim=-1)):
            return None
    start = 0
    for layer in int4:
        layer.packed = packed[start : start + layer.out_features]
        start += layer.out_features
    return fused
