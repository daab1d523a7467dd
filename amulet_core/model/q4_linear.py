"""Linear layers of 4-bit weights multiplied with the inputs in 16-bit blocks, as integers (``--quantization
int4-q16``, ``auto``'s choice for a 4-bit GGUF model on a CPU).

A block of 32 weights is ``lowest + step * q`` with ``q`` in 0..15 (GGUF's Q4_1; Q4_0 and Q4_K sub-blocks are the
same form, recovered by :func:`~amulet_core.model.four_bit.four_bit_codes`), its step and lowest value in float16
(a Q4_1 GGUF's are float16 numbers, kept exactly; any other weight's are rounded to float16: :func:`half_blocks`).
``q4_linear.c`` (:mod:`amulet_core.native`) scales each row's blocks of 32 inputs to 16-bit codes (``max |x| /
32767`` a step, rounded to nearest even), multiplies them with the weights' codes as integers (AVX2's 16-bit
multiply-adds, exact), and adds the blocks' scaled sums in block order, eight outputs side by side in the vector
lanes: a row's outputs depend on that row and the weights only (one row or many, any number of threads, the same
bits), so the deterministic forward stays batch-invariant.

The weights are the model's, exactly, and the inputs keep 15 bits a block (a relative error of about 1e-5 of the
block's largest input): the embedded SmolLM2 answered six test questions word for word as its float32 model did,
where torch's int4 kernel (inputs rounded to bfloat16) changed two answers and llama.cpp's arithmetic (inputs in
8-bit blocks, which this kernel computed first) three. Measured on an AVX2 CPU, one thread, the whole decode step
of that model: the 4-bit products 7.5 ms against torch's int4 kernel's 16.4 (``python -m benchmarks.step_parts``).
"""

from __future__ import annotations

import ctypes
from typing import cast

import torch
from torch import nn

from amulet_core.model.rowwise_linear import RowwiseLinear
from amulet_core.native.build import SOURCES, Library, load_library

BLOCK = 32
"""Inputs per block of weights and of inputs."""
LANES = 8
"""Outputs the kernel computes side by side."""
SOURCE = SOURCES / "q4_linear.c"

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_ARGUMENTS = [_P, _I64, _I64, _P, _I64, ctypes.c_int, _P]
"""``q4_linear``'s: x, rows, in, weights, out, threads, y."""


def load_q4_library() -> tuple[Library | None, str]:
    """The kernel compiled for this machine (:func:`~amulet_core.native.build.load_library`), or None and why not."""
    return load_library(SOURCE)


def pack_weights(codes: torch.Tensor, steps: torch.Tensor, lowest: torch.Tensor) -> torch.Tensor:
    """Codes ``[out, in]`` in 0..15 and float16 block values ``[out, in / 32]`` as the kernel reads them:
    ``[out / 8, in / 32, 160]`` bytes, eight outputs' block after block: its 128 bytes of codes (byte
    ``32j + 16L + 8h + t`` holding, in its low nibble, the code of output ``4L + t // 2`` for input
    ``8j + 2h + t % 2`` and, in its high nibble, for input ``8j + 4 + 2h + t % 2``: zero-extended to 16 bits, each
    128-bit lane of a chunk's nibbles gives four outputs' pairs of inputs, which a multiply-add sums per output),
    then its eight steps and eight lowest values."""
    out_features, in_features = codes.shape
    groups, blocks = out_features // LANES, in_features // BLOCK
    # codes [g, (L, k), b, (j, n, h, s)] -> [g, b, j, n, L, h, k, s]: output 4L + k, input 8j + 4n + 2h + s
    split = codes.to(torch.uint8).view(groups, 2, 4, blocks, 4, 2, 2, 2).permute(0, 3, 4, 5, 1, 6, 2, 7)
    packed = (split[:, :, :, 0] | (split[:, :, :, 1] << 4)).reshape(groups, blocks, 4 * BLOCK)

    def per_lane(values: torch.Tensor) -> torch.Tensor:
        lanes = values.view(groups, LANES, blocks).permute(0, 2, 1).contiguous()
        return lanes.view(torch.uint8).view(groups, blocks, -1)

    return torch.cat([packed, per_lane(steps.half()), per_lane(lowest.half())], dim=-1).contiguous()


def half_blocks(steps: torch.Tensor, lowest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's steps and lowest values in float16 (20 bytes a block of 32, as GGUF's Q4_1): a Q4_1 GGUF's are
    float16 numbers, so its weights stay exact (``tests/core/model/test_q4_linear.py`` checks the served model's);
    any other weight's move by at most 15 float16 roundings of its step (against the half step its codes' own
    rounding costs)."""
    return steps.half(), lowest.half()


class Q4Linear(RowwiseLinear):
    """``nn.Linear`` whose weight is ``lowest + step * q`` in blocks of 32 inputs (float16 steps and lowest values),
    multiplied by ``q4_linear.c`` with the inputs in 16-bit blocks; returns the input's dtype. Made by :meth:`of`."""

    weights: torch.Tensor

    def __init__(self, weights: torch.Tensor, library: Library, bias: torch.Tensor | None = None) -> None:
        """``weights``: :func:`pack_weights`' bytes."""
        super().__init__()
        self.out_features, self.in_features = weights.shape[0] * LANES, weights.shape[1] * BLOCK
        self.register_buffer("weights", weights)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.library = library

    @classmethod
    def of(
        cls, codes: torch.Tensor, steps: torch.Tensor, lowest: torch.Tensor, library: Library, bias: torch.Tensor | None = None
    ) -> Q4Linear:
        """The layer of codes ``[out, in]`` in 0..15, steps and lowest values ``[out, in / 32]`` (kept as float16:
        :func:`half_blocks`)."""
        out_features, in_features = codes.shape
        if out_features % LANES or in_features % BLOCK or steps.shape != (out_features, in_features // BLOCK):
            raise ValueError(f"a 4-bit layer needs outputs in eights and inputs in blocks of 32, not {tuple(codes.shape)}")
        return cls(pack_weights(codes, steps, lowest), library, bias)

    def product(self, rows: torch.Tensor) -> torch.Tensor:
        return q4_product(self, rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """:class:`RowwiseLinear`'s forward; float32 inputs of any shape, contiguous, with no bias (a decode step's
        rows) go to the kernel as they are, with none of its reshapes (a call's Python cost was six times the
        kernel's on a decode row)."""
        if x.dtype == torch.float32 and x.shape[-1] == self.in_features and self.bias is None and x.is_contiguous():
            return q4_product(self, x)
        return super().forward(x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, 4-bit blocks of {BLOCK}, 16-bit inputs"


def q4_product(layer: Q4Linear, rows: torch.Tensor) -> torch.Tensor:
    """``rows`` (``[..., in]`` float32, contiguous) times ``layer``'s weight: ``[..., out]`` float32, by the kernel."""
    shape, width = rows.shape, layer.out_features
    # (torch.empty of ints, not of a shape built from rows.shape: 1.8 against 4.4 us, paid 120 times a decode step)
    if len(shape) == 3:
        out, count = torch.empty(shape[0], shape[1], width, dtype=torch.float32), shape[0] * shape[1]
    elif len(shape) == 2:
        out, count = torch.empty(shape[0], width, dtype=torch.float32), shape[0]
    else:
        out, count = torch.empty((*shape[:-1], width), dtype=torch.float32), rows.numel() // layer.in_features
    weights = cast(torch.Tensor, layer._buffers["weights"])  # (nn.Module's __getattr__ for a buffer: 1.4 us)
    failed = layer.library.function("q4_linear", ctypes.c_int, _ARGUMENTS)(
        rows.data_ptr(), count, layer.in_features, weights.data_ptr(), width, torch.get_num_threads(), out.data_ptr()
    )
    if failed:
        raise MemoryError(f"q4_linear: no memory for {count} rows' 16-bit inputs")
    return out


def fuse_q4(layers: list[Q4Linear]) -> Q4Linear | None:
    """One :class:`Q4Linear` whose outputs are ``layers``' side by side, or None unless they share their inputs and
    have biases on all or none. Every output is computed alone, so the fused layer gives
    each layer's bits; the layers' buffers become views of the fused layer's (one copy of the weights)."""
    first = layers[0]
    biases = [layer.bias for layer in layers]
    if any(layer.in_features != first.in_features for layer in layers) or len({b is None for b in biases}) > 1:
        return None
    bias = None if biases[0] is None else torch.cat([b.detach() for b in biases if b is not None])
    fused = Q4Linear(torch.cat([layer.weights for layer in layers]), first.library, bias)
    start = 0
    for layer in layers:
        groups = layer.weights.shape[0]
        layer.weights = fused.weights[start : start + groups]
        start += groups
    return fused
