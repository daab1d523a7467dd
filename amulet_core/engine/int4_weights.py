"""Linear weights that are already 4-bit (a Q4_0 or Q4_1 GGUF model's), multiplied by torch's int4 CPU kernel.

A GGUF file quantizes a weight in groups of :data:`GROUP` consecutive inputs: ``w = d * q + m`` with ``q`` in
0..15 (Q4_1; Q4_0 is ``d * (q - 8)``). Loaded through transformers the weights are dequantized and cast to the
model's dtype, and the products then read 16 bits a weight from memory, where llama.cpp reads 4.5 to 5. Here the
4-bit codes are recovered from the loaded weights (a group's lowest value is ``m``, its step ``(highest - m) /
15``; a weight of the group lies within a quarter step of a level, else the layer is not 4-bit and keeps its
weight) and given to ``torch.ops.aten._weight_int4pack_mm_for_cpu`` (the kernel of torchao's int4 weight-only
CPU path: ``(q - 8) * scale + zero`` in float32, products accumulated in float32).

Measured on this project's 2-core AVX512-BF16 machine, SmolLM2-135M (Q4_1) in bfloat16, one torch thread:

* the kernel's bits for a row do not depend on how many rows the product has (1 to 700, at 1 and 2 threads),
  so it keeps the deterministic forward batch-invariant (:mod:`amulet_core.engine.invariant_ops`);
* the engine's decode steps ran 1.6 to 1.9 times faster with one stream (``base`` and ``amulet``), 1.3 to 1.4 times with
  four, and as fast at about 16 rows a step; 32 rows a step ran 0.84 times as fast, and a prefill 1.4 to 1.9 times
  slower (the kernel's cost grows with the rows, where oneDNN's bfloat16 product is bound by reading the weight):
  ``python -m benchmarks.int4_cost``.

The scale and zero are rounded to the activations' dtype (bfloat16): a weight differs from its bfloat16 copy by
about one bfloat16 rounding, as that copy differs from the GGUF's own value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

GROUP = 32
"""Inputs per quantization group (GGUF's Q4_0 and Q4_1 blocks)."""

LEVEL_TOLERANCE = 0.25
"""Most distance, in steps, of a weight from its group's nearest level for the layer to count as 4-bit."""

INT4_KERNEL = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
    torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"
)


@dataclass(frozen=True)
class Int4Weight:
    """One linear layer's weight as int4 codes packed for the CPU kernel, with its groups' scales and zeros."""

    packed: torch.Tensor
    scales_and_zeros: torch.Tensor
    """``[in_features / GROUP, out_features, 2]`` in the activations' dtype."""
    out_features: int
    source: int
    """``data_ptr`` of the weight it was made from (a layer whose weight was replaced since does not use it)."""


def four_bit_codes(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(codes ``[out, in]`` int32 in 0..15, steps and lowest values ``[out, in / GROUP]`` float32) of a weight whose
    every group of :data:`GROUP` inputs takes 16 evenly spaced levels or fewer; None for any other weight."""
    if weight.dim() != 2 or weight.shape[1] % GROUP or weight.numel() == 0:
        return None
    out_features, in_features = weight.shape
    groups = weight.detach().float().view(out_features, in_features // GROUP, GROUP)
    lowest = groups.amin(-1)
    step = (groups.amax(-1) - lowest) / 15
    safe = torch.where(step > 0, step, torch.ones_like(step)).unsqueeze(-1)
    levels = (groups - lowest.unsqueeze(-1)) / safe
    codes = levels.round()
    if not bool(torch.isfinite(levels).all()) or float((levels - codes).abs().max()) > LEVEL_TOLERANCE:
        return None
    return codes.clamp_(0, 15).to(torch.int32).view(out_features, in_features), step, lowest


def int4_weight(weight: torch.Tensor) -> Int4Weight | None:
    """The int4 form of a 4-bit CPU weight (:func:`four_bit_codes`) in bfloat16 or float32, else None."""
    if not INT4_KERNEL or weight.device.type != "cpu" or weight.dtype not in (torch.bfloat16, torch.float32):
        return None
    found = four_bit_codes(weight)
    if found is None:
        return None
    codes, step, lowest = found
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    except RuntimeError:  # a shape the kernel does not take
        return None
    # The kernel computes (q - 8) * scale + zero: Q4_1's d * q + m is scale d, zero m + 8 d.
    scales_and_zeros = torch.stack([step.t(), (lowest + 8 * step).t()], dim=-1).to(weight.dtype).contiguous()
    return Int4Weight(packed, scales_and_zeros, weight.shape[0], weight.data_ptr())


def int4_layers(model: nn.Module) -> dict[nn.Module, Int4Weight]:
    """Every linear layer of ``model`` whose weight is 4-bit (:func:`int4_weight`), with its int4 form."""
    found: dict[nn.Module, Int4Weight] = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, nn.Linear) and isinstance(weight, torch.Tensor):
            int4 = int4_weight(weight)
            if int4 is not None:
                found[module] = int4
    return found


def int4_linear(x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with an int4 weight; a row's bits do not depend on the other rows (the bias added after)."""
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, weight.packed, GROUP, weight.scales_and_zeros)
    if bias is not None:
        out = out + bias
    return out.view(*x.shape[:-1], weight.out_features)
