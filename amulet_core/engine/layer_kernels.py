"""A decoder layer's norms and rotations as one compiled call each on a CPU, with torch's bits.

On one CPU core a torch operation on a decode step's few rows costs 2 to 7 us whatever its size, and the family
forward's RMS norm is six of them (the residual addition before it one more), its rotary embedding four: about
1.5 ms of a 20 ms step of the embedded SmolLM2. ``layer_ops.c`` (:mod:`amulet_core.native`) does each in one call,
with the same products and sums in the same order as torch's operations, so the same bits: the norm's mean is
torch's float32 sum, whose order depends on the lanes of torch's vectors (8 with AVX2, 16 with AVX512).
:func:`load_layer_kernels` compiles the library, finds those lanes by comparing the kernel's norms with torch's on
random rows of the model's sizes, and gives None (torch's operations stay) where no compiler builds it or no width
gives torch's bits, so a torch whose sum changes order is noticed, not followed blindly.

Float32 only (a bfloat16 model keeps torch's operations), contiguous rows of at least one vector.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Iterable
from typing import Any

import torch

from amulet_core.native.build import SOURCES, Library, load_library

logger = logging.getLogger(__name__)

SOURCE = SOURCES / "layer_ops.c"
WIDTHS = (8, 16, 4)
"""Lanes of torch's float vectors to try: AVX2 (and most others), AVX512, 128-bit vectors."""

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_NORM_ARGUMENTS = [_P, _P, _I64, _I64, _P, ctypes.c_float, ctypes.c_int, ctypes.c_int, _P, _P]
"""``rms_norm``'s: x, residual, rows, n, weight, eps, width, threads, hidden, out."""
_ROTATE_ARGUMENTS = [_P, _I64, _I64, _I64, _I64, _P, _P, ctypes.c_int, _P]
"""``rotate``'s: x, row_stride, tokens, heads, d, cos, signed_sin, threads, out."""


def torch_rms_norm(norm: Any, x: torch.Tensor) -> torch.Tensor:
    """The family's ``RMSNorm.forward`` (``weight * (x * rsqrt(mean(x ** 2) + eps))`` in float32, then ``x``'s
    dtype): the same operations on the same dtypes, less its conversions of a float32 ``x`` to float32 and with its
    temporaries reused in place (about 10 of a norm's 35 us on one core)."""
    h = x if x.dtype == torch.float32 else x.to(torch.float32)
    h = h * h.pow(2).mean(-1, keepdim=True).add_(norm.variance_epsilon).rsqrt_()
    if x.dtype != torch.float32:
        h = h.to(x.dtype)
    weight = norm.weight
    return h.mul_(weight) if weight.dtype == h.dtype and weight.shape[-1:] == h.shape[-1:] else weight * h


def torch_rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """transformers' ``x * cos + rotate_half(x) * sin`` in fewer operations, each product and sum with its bits:
    ``rotate_half`` moves the last dim's second part first and negates it, so ``x`` rolled by that part's length
    times the sine with its first part negated (``signed_sin``) gives every product alike (a sign is exact)."""
    lead = x.shape[-1] - x.shape[-1] // 2
    return (x * cos).add_(torch.roll(x, lead, -1).mul_(signed_sin))


class TorchLayerOps:
    """The norms and rotations as torch's operations (:func:`torch_rms_norm`, :func:`torch_rotate`)."""

    def add_norm(self, norm: Any, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h, norm of h)`` with ``h = residual + x`` (``x`` itself without ``residual``)."""
        hidden = x if residual is None else residual + x
        return hidden, torch_rms_norm(norm, hidden)

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        """:func:`torch_rotate`."""
        return torch_rotate(x, cos, signed_sin)

    def describe(self) -> str:
        return "torch operations"


class LayerKernels(TorchLayerOps):
    """``layer_ops.c`` loaded, with the lanes of torch's sum (:func:`load_layer_kernels` makes it): each norm and
    rotation one call where its tensors are as the kernels read them, else torch's operations."""

    def __init__(self, library: Library, width: int) -> None:
        self.library = library
        self.width = width
        self._norm = library.function("rms_norm", None, _NORM_ARGUMENTS)
        self._rotate = library.function("rotate", None, _ROTATE_ARGUMENTS)
        self._usable: dict[int, tuple[Any, bool]] = {}
        """Per norm module (by id): its weight tensor when last looked at and whether the kernel reads it (looked at
        again when the weight changes)."""

    def _weight_of(self, norm: Any) -> tuple[torch.Tensor, float] | None:
        """``norm``'s weight and epsilon where the kernel reads them: a float32 1-D weight, contiguous, on the CPU, of at
        least one vector, and a float epsilon; else None. The checks that do not change with the tensor's data are
        made once per weight tensor (a decode step asks 61 times, and they cost more than the norm); its dtype and
        size at every call."""
        parameters = getattr(norm, "_parameters", None)
        weight = parameters.get("weight") if isinstance(parameters, dict) else getattr(norm, "weight", None)
        epsilon = getattr(norm, "variance_epsilon", None)
        if not isinstance(weight, torch.Tensor) or weight.dtype != torch.float32 or not isinstance(epsilon, float):
            return None
        known = self._usable.get(id(norm))
        if known is None or known[0] is not weight:
            usable = weight.device.type == "cpu" and weight.dim() == 1 and weight.is_contiguous()
            known = self._usable[id(norm)] = (weight, usable)
        return (weight, epsilon) if known[1] and weight.shape[0] >= self.width else None

    def norms(self, norm: Any, x: torch.Tensor, residual: torch.Tensor | None = None) -> bool:
        """Whether the kernel computes ``norm`` of ``x`` (``residual + x``): float32 contiguous rows on the CPU of at
        least one vector (``residual`` of their shape and kind), a float32 weight of their size."""
        return self._kernel_norm(norm, x, residual) is not None

    def _kernel_norm(self, norm: Any, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, float] | None:
        """``norm``'s weight and epsilon where the kernel computes ``norm`` of ``x`` (:meth:`norms`), else None."""
        found = self._weight_of(norm)
        size = None if found is None else found[0].shape[0]
        ok = (
            size is not None
            and x.dtype == torch.float32
            and x.is_cpu
            and x.shape[-1] == size
            and x.is_contiguous()
            and (
                residual is None
                or (
                    residual.dtype == torch.float32 and residual.is_cpu and residual.shape == x.shape and residual.is_contiguous()
                )
            )
        )
        return found if ok else None

    def add_norm(self, norm: Any, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        found = self._kernel_norm(norm, x, residual)
        if found is None:
            return super().add_norm(norm, x, residual)
        weight, epsilon = found
        n = x.shape[-1]
        out = torch.empty_like(x)
        hidden = x if residual is None else torch.empty_like(x)
        self._norm(
            x.data_ptr(), None if residual is None else residual.data_ptr(), x.numel() // n, n, weight.data_ptr(), epsilon,
            self.width, torch.get_num_threads(), hidden.data_ptr(), out.data_ptr(),
        )  # fmt: skip
        return hidden, out

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        """:func:`torch_rotate` of ``x`` ``[1, heads, N, d]``; in one call where its heads are contiguous and lie
        side by side in each of its N rows (a projection's output viewed as heads and transposed), with ``cos`` and
        ``signed_sin`` ``[1, 1, N, d]`` contiguous, all float32 on the CPU: then laid out as ``[1, N, heads, d]``, as
        torch's operations lay it out."""
        if not self._rotates(x, cos, signed_sin):
            return super().rotate(x, cos, signed_sin)
        heads, tokens, d = x.shape[1], x.shape[2], x.shape[3]
        out = torch.empty(1, tokens, heads, d, dtype=torch.float32)
        self._rotate(
            x.data_ptr(), x.stride(2), tokens, heads, d, cos.data_ptr(), signed_sin.data_ptr(),
            torch.get_num_threads(), out.data_ptr(),
        )  # fmt: skip
        return out.transpose(1, 2)

    @staticmethod
    def _rotates(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> bool:
        f32 = torch.float32
        if x.dim() != 4 or x.dtype != f32 or cos.dtype != f32 or signed_sin.dtype != f32:
            return False
        if not (x.is_cpu and cos.is_cpu and signed_sin.is_cpu):
            return False
        one, _, tokens, d = x.shape
        shape = (1, 1, tokens, d)
        return (
            one == 1
            and x.stride(3) == 1
            and x.stride(1) == d
            and cos.shape == shape
            and signed_sin.shape == shape
            and cos.is_contiguous()
            and signed_sin.is_contiguous()
        )

    def describe(self) -> str:
        return f"one compiled call each ({self.width}-lane sums as torch's), {self.library.describe()}"


def layer_ops_for(device: torch.device, dtype: torch.dtype, sizes: Iterable[int]) -> TorchLayerOps:
    """The family forward's norms and rotations on ``device`` in ``dtype``: :class:`LayerKernels` on a CPU in
    float32 where they load and give torch's bits (:func:`load_layer_kernels`), else torch's operations (with a
    warning where the kernels were wanted and did not load)."""
    if device.type != "cpu" or dtype != torch.float32:
        return TorchLayerOps()
    kernels, why = load_layer_kernels(sizes)
    if kernels is None:
        logger.warning("norms and rotations: torch operations (%s)", why)
        return TorchLayerOps()
    return kernels


def load_layer_kernels(sizes: Iterable[int]) -> tuple[LayerKernels | None, str]:
    """The kernels for rows of ``sizes`` (a model's hidden size and head dim), or None and why not: compiled for
    this machine (:func:`~amulet_core.native.build.load_library`) and checked against torch's operations on random
    rows of each size (one row and several, with and without a residual), with the first of :data:`WIDTHS` whose
    norms give torch's bits."""
    library, why = load_library(SOURCE)
    if library is None:
        return None, why
    sizes = sorted(set(sizes))
    for width in WIDTHS:
        kernels = LayerKernels(library, width)
        if all(_same_bits(kernels, n) for n in sizes if n >= width):
            return kernels, kernels.describe()
    return None, f"no vector width gives torch {torch.__version__}'s norms (torch's operations kept)"


class _Probe:
    def __init__(self, n: int, generator: torch.Generator) -> None:
        self.weight = torch.randn(n, generator=generator)
        self.variance_epsilon = 1e-6


def _same_bits(kernels: LayerKernels, n: int) -> bool:
    """Whether the kernels give torch's bits on random rows of ``n``: norms of 1 and 5 rows (with a residual, and
    of values a thousand times larger), and a rotation of heads of ``n``."""
    generator = torch.Generator().manual_seed(n)
    norm = _Probe(n, generator)
    for rows, scale in ((1, 1.0), (5, 1000.0)):
        x = torch.randn(1, rows, n, generator=generator) * scale
        residual = torch.randn(1, rows, n, generator=generator)
        if not kernels.norms(norm, x, residual):
            return False
        _, alone = kernels.add_norm(norm, x)
        hidden, fused = kernels.add_norm(norm, x, residual)
        want = residual + x
        if not (torch.equal(alone, torch_rms_norm(norm, x)) and torch.equal(hidden, want)):
            return False
        if not torch.equal(fused, torch_rms_norm(norm, want)):
            return False
    qkv = torch.randn(1, 3, 2 * n, generator=generator)
    x = qkv.view(1, 3, 2, n).transpose(1, 2)
    cos, sin = torch.randn(2, 1, 1, 3, n, generator=generator)
    if not kernels._rotates(x, cos, sin):
        return False
    rotated, want = kernels.rotate(x, cos, sin), torch_rotate(x, cos, sin)
    return rotated.stride() == want.stride() and torch.equal(rotated, want)
