"""A GGUF model's 8-bit output layer multiplied as its own 8-bit blocks (``--quantization auto``, float32, a CPU).

Small GGUF models keep their token embedding, which the output layer shares, in Q8_0: blocks of 32 weights, each
an int8 code times the block's float16 scale. transformers dequantizes them to float32, so every decode step read
the output layer as 4 bytes a weight (113 MB for SmolLM2's 49,152 x 576), the largest single product of the step
on a CPU without native bfloat16. :func:`q8_blocks` gets the codes and scales back, exactly, from such a float32
weight (a block's largest magnitude is 127 of its steps; every weight must be its code times that step, to the
bit, or nothing is changed), and :class:`Q8Linear` multiplies them with ``q8_linear.c``
(:mod:`amulet_core.native`): a quarter of the bytes, each output's sum in one fixed order (block by block, the
32 products of a block in input order), so a row's logits do not depend on the other rows or the threads.

The weights are the model's, to the bit; only the order of the additions differs from the dense product's (the
tests compare the logits with float64 ones). The embeddings keep their float32 weight. A bfloat16 model's
weights are no longer exact multiples of a float16 scale, so its output layer stays dense.
"""

from __future__ import annotations

import ctypes
import logging

import torch
from torch import nn

from amulet_core.native.build import SOURCES, Library, load_library

logger = logging.getLogger(__name__)

BLOCK = 32
"""Inputs per block (GGUF's Q8_0)."""
LANES = 8
"""Outputs the kernel computes side by side."""
SOURCE = SOURCES / "q8_linear.c"

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_ARGUMENTS = [_P, _I64, _I64, _P, _P, _I64, ctypes.c_int, _P]
"""``q8_linear``'s: x, rows, in, codes, scales, out, threads, y."""
_OUTPUTS_ARGUMENTS = [_P, _I64, _P, _P, _P, _I64, _P]
"""``q8_linear_outputs``': x, in, codes, scales, output numbers, their count, y."""


def q8_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(codes ``[out, in]`` int8, scales ``[out, in / 32]`` float32) whose products are ``weight`` bit for bit, or
    None: a weight not in float32, of a shape that does not split into blocks, or not 8-bit."""
    if weight.dtype != torch.float32 or weight.dim() != 2 or weight.shape[1] % BLOCK or weight.numel() == 0:
        return None
    out_features, in_features = weight.shape
    blocks = weight.detach().view(out_features, in_features // BLOCK, BLOCK)
    scales = blocks.abs().amax(-1) / 127
    safe = torch.where(scales > 0, scales, torch.ones_like(scales)).unsqueeze(-1)
    codes = (blocks / safe).round()
    if not bool(torch.isfinite(codes).all()) or float(codes.abs().max()) > 127:
        return None
    if not torch.equal(codes * scales.unsqueeze(-1), blocks):
        return None
    return codes.to(torch.int8).view(out_features, in_features), scales.contiguous()


class Q8Linear(nn.Module):
    """An ``nn.Linear`` without bias whose weight is ``codes * scales`` (blocks of 32 inputs), computed by the
    compiled kernel on float32 inputs; returns float32."""

    codes: torch.Tensor
    scales: torch.Tensor

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, library: Library) -> None:
        super().__init__()
        self.out_features, self.in_features = codes.shape
        if self.out_features % LANES or self.in_features % BLOCK:
            raise ValueError(f"an 8-bit layer needs outputs in eights and inputs in blocks of 32, not {tuple(codes.shape)}")
        groups, blocks = self.out_features // LANES, self.in_features // BLOCK
        # [out / 8, blocks, 32, 8]: a block's input i holds eight outputs' codes side by side
        packed = codes.view(groups, LANES, blocks, BLOCK).permute(0, 2, 3, 1).contiguous()
        self.register_buffer("codes", packed)
        self.register_buffer("scales", scales.view(groups, LANES, blocks).permute(0, 2, 1).contiguous())
        self.library = library

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float().contiguous()
        out = torch.empty(rows.shape[0], self.out_features, dtype=torch.float32)
        self.library.function("q8_linear", None, _ARGUMENTS)(
            rows.data_ptr(), rows.shape[0], self.in_features, self.codes.data_ptr(), self.scales.data_ptr(),
            self.out_features, torch.get_num_threads(), out.data_ptr(),
        )  # fmt: skip
        return out.view(*x.shape[:-1], self.out_features)

    def outputs_at(self, x: torch.Tensor, outputs: list[int]) -> torch.Tensor:
        """Float32 ``[len(outputs)]``: the outputs numbered ``outputs`` of one input row ``x`` (``[in_features]``), each
        with the bits :meth:`forward` gives it (the kernel computes each output's group of eight, every output by the
        same operations in the same order whatever else it computes)."""
        if any(not 0 <= o < self.out_features for o in outputs):
            raise IndexError(f"outputs out of range for {self.out_features} outputs")
        row = x.reshape(self.in_features).float().contiguous()
        y = torch.empty(len(outputs), dtype=torch.float32)
        self.library.function("q8_linear_outputs", None, _OUTPUTS_ARGUMENTS)(
            row.data_ptr(), self.in_features, self.codes.data_ptr(), self.scales.data_ptr(),
            (ctypes.c_int64 * len(outputs))(*outputs), len(outputs), y.data_ptr(),
        )  # fmt: skip
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, 8-bit blocks of {BLOCK}"


def q8_output_layer(model: nn.Module) -> str | None:
    """Replace ``model``'s output layer by its :class:`Q8Linear` where its weight is 8-bit (:func:`q8_blocks`) and the
    kernel builds; what was done, or None where nothing was."""
    getter, setter = getattr(model, "get_output_embeddings", None), getattr(model, "set_output_embeddings", None)
    output = getter() if callable(getter) else None
    if not callable(setter) or not isinstance(output, nn.Linear) or output.bias is not None or output.weight.device.type != "cpu":
        return None
    if output.out_features % LANES:
        return None
    found = q8_blocks(output.weight)
    if found is None:
        return None
    library, why = load_library(SOURCE)
    if library is None:
        logger.warning("the output layer stays dense: %s", why)
        return None
    setter(Q8Linear(*found, library))
    done = f"the output layer ({output.out_features} x {output.in_features}) as 8-bit blocks, {library.describe()}"
    logger.info("quantization: %s", done)
    return done
