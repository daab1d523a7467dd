"""Batch-invariant linear layers and activations: :func:`install` on a model, then forward inside :func:`batch_invariant`.

A packed step holds every scheduled token of every sequence as one row of each matrix product; what else is
in the step (other requests, how a prompt was chunked, whether its prefix came from the cache) must not change
a row's bits. Measured on this project's CPUs (torch 2.13, MKL 2024.2, oneDNN 3.12, 1 to 16 threads):

* ``F.linear`` in float32 goes to MKL, whose kernel and order of additions depend on the number of rows (one
  row, two or three, four or more, and the rows each thread gets): a row's bits changed with the batch. oneDNN
  (``torch.ops.mkldnn._linear_pointwise``, float32 and bfloat16) gave the same bits for a row among 2 to 4,096
  rows of shapes up to 14,336 x 4,864 at every thread count tried; a row alone is a matrix-vector product with
  another order (in bfloat16 too, for 4,096 inputs and more), so it is computed twice side by side.
* ``F.silu`` and ``F.gelu`` in float32 compute the tail of each thread's chunk with scalar code that rounds
  differently from the vector code, so a value's bits depended on where it fell in the tensor; they are
  computed here from ``exp``/``tanh``/``erf`` (which agree lane for lane) in float32.
* Normalisation (a row's mean), RoPE, residual additions and the softmax are row-wise and kept as they are.

:func:`install` gives the model's ``nn.Linear`` layers and its SiLU/GELU activation modules forwards that run
these versions while :func:`batch_invariant` is active in the calling context (a ``ContextVar``: per thread),
and their own otherwise, so a model shared with other users computes as before outside it. (A torch function
mode would catch every function but cost a Python call per operation: 10 to 20% of a SmolLM2 decode step.)
:class:`PackedWeights` keeps the weights reordered for oneDNN once (a copy of them), which makes the products
faster than the plain ones (the same bits on AVX512 CPUs, other bits as batch-invariant on AVX2 ones).
Quantized layers (:mod:`amulet_core.model.quantization`) are not ``nn.Linear`` and are left as they are: their
kernels are batch-invariant themselves.
On a device without oneDNN (CUDA), and for bfloat16 on a CPU whose oneDNN has no bfloat16 product (AVX2 only), a
linear layer runs tile by tile, every tile of :data:`ROW_TILE` rows (one product shape whatever the rows); on such
a CPU the bfloat16 determinism tests of ``tests/engine/test_determinism.py`` pass on it (not measured on CUDA).
"""

from __future__ import annotations

import functools
import logging
import math
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeGuard

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

ROW_TILE = 64
"""Rows per problem of the tiled linear layer (devices without oneDNN)."""

PACKED_RAM_FRACTION = 0.25
"""Most of the available RAM that the packed copy of the linear weights may take."""

_ONEDNN = torch.backends.mkldnn.is_available()
ONEDNN_LINEAR_DTYPES = (
    (torch.float32, torch.bfloat16) if _ONEDNN and torch.ops.mkldnn._is_mkldnn_bf16_supported() else (torch.float32,)
)
"""The dtypes oneDNN's linear layer takes here: bfloat16 only on a CPU with AVX512 (BW, VL, DQ) or AVX-NE-CONVERT,
elsewhere it refuses to build the product (bfloat16 linear layers then run tiled, as on a device without oneDNN)."""
_LINEAR = torch.ops.mkldnn._linear_pointwise.default if _ONEDNN else None
"""oneDNN's linear layer, the overload itself (its resolution costs about 3 us a call)."""

_ACTIVE: ContextVar[PackedWeights | None] = ContextVar("amulet_batch_invariant", default=None)
"""The weights of the forward pass running batch-invariantly in this context (set only by :func:`batch_invariant`)."""

_INVARIANT = "_amulet_invariant"
"""Attribute of an installed module: the batch-invariant function of its input."""


class PackedWeights:
    """Linear layers' weights reordered once for oneDNN (``torch.ops.mkldnn._reorder_linear_weight``), without
    reordering the weight at every call (SmolLM2's products took 1.1 to 1.9 times longer with the plain weights).
    Batch-invariant as the plain weight is; on AVX512 CPUs the same bits as the plain weight from 2 rows up
    (measured at 1 to 8 threads), on AVX2 ones other bits (oneDNN multiplies a reordered weight with another
    kernel), so a forward pass uses one or the other throughout. A copy of the weights, owned by
    whoever runs the forward passes; a layer without a packed weight (none packed, or its weight replaced since)
    uses its plain one."""

    def __init__(self, model: nn.Module | None = None) -> None:
        self._packed: dict[nn.Module, tuple[int, torch.Tensor]] = {}
        for module in model.modules() if model is not None else ():
            weight = getattr(module, "weight", None)
            if isinstance(module, nn.Linear) and _packable(weight):
                packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 2)
                self._packed[module] = (weight.data_ptr(), packed)

    @staticmethod
    def size_of(model: nn.Module) -> int:
        """Bytes the packed weights of ``model`` would take (its packable linear layers' weights)."""
        weights = [getattr(m, "weight", None) for m in model.modules() if isinstance(m, nn.Linear)]
        return sum(w.numel() * w.element_size() for w in weights if _packable(w))

    def __len__(self) -> int:
        return len(self._packed)

    def weight(self, module: Any) -> torch.Tensor:
        """The weight a linear layer multiplies by: its packed one, else its own."""
        entry = self._packed.get(module)
        return entry[1] if entry is not None and entry[0] == module.weight.data_ptr() else module.weight


def invariant_weights(model: nn.Module, available_ram: int) -> PackedWeights:
    """Install the batch-invariant layers on ``model`` and pack its linear weights when the copy takes at most
    ``PACKED_RAM_FRACTION`` of ``available_ram`` bytes (else none is packed: the same bits, slower)."""
    install(model)
    size = PackedWeights.size_of(model)
    if size == 0 or size > available_ram * PACKED_RAM_FRACTION:
        return PackedWeights()
    logger.info("deterministic decoding: %.2f GiB of linear weights packed for oneDNN", size / (1 << 30))
    return PackedWeights(model)


def _packable(weight: Any) -> TypeGuard[torch.Tensor]:
    return (
        _ONEDNN
        and isinstance(weight, torch.Tensor)
        and weight.device.type == "cpu"
        and weight.dtype in ONEDNN_LINEAR_DTYPES
        and weight.dim() == 2
    )


@contextmanager
def batch_invariant(weights: PackedWeights | None = None) -> Iterator[None]:
    """Within this block (this thread or task only), installed modules run their batch-invariant versions, linear
    layers with ``weights``' packed weights where it has them."""
    token = _ACTIVE.set(weights if weights is not None else PackedWeights())
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def install(model: nn.Module) -> int:
    """Give the model's linear layers and SiLU/GELU activation modules forwards that follow :func:`batch_invariant`
    (idempotent). Returns how many modules follow it; a module whose forward is already patched by someone else
    (a hook library) is left as it is, and logged."""
    installed, skipped = 0, 0
    for module in model.modules():
        if hasattr(module, _INVARIANT):
            installed += 1
            continue
        invariant = _invariant_function(module)
        if invariant is None:
            continue
        if "forward" in vars(module):
            skipped += 1
            continue
        setattr(module, _INVARIANT, invariant)
        module.forward = types.MethodType(_switching_forward, module)
        installed += 1
    if skipped:
        logger.warning("%d layers have patched forwards and are not batch-invariant", skipped)
    return installed


def _switching_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An installed module's forward: the batch-invariant function inside :func:`batch_invariant`, else its own.
    Bound to the module (a copy of the model rebinds it to the copy)."""
    weights = _ACTIVE.get()
    if weights is not None:
        return getattr(self, _INVARIANT)(self, x, weights)
    return type(self).forward(self, x)


def _invariant_function(module: nn.Module) -> Callable[[nn.Module, torch.Tensor, PackedWeights], torch.Tensor] | None:
    if isinstance(module, nn.Linear):
        return _linear_module
    name = type(module).__name__
    if isinstance(module, nn.SiLU) or name == "SiLUActivation":
        return _silu_module
    if isinstance(module, nn.GELU):
        return functools.partial(_gelu_module, approximate=module.approximate)
    act = getattr(module, "act", None)
    if name == "GELUActivation" and act is F.gelu:
        return functools.partial(_gelu_module, approximate="none")
    if name == "GELUTanh" and isinstance(act, functools.partial) and act.func is F.gelu:
        return functools.partial(_gelu_module, approximate="tanh")
    return None


def _linear_module(module: Any, x: torch.Tensor, weights: PackedWeights) -> torch.Tensor:
    return invariant_linear(x, weights.weight(module), module.bias)


def _silu_module(module: nn.Module, x: torch.Tensor, weights: PackedWeights) -> torch.Tensor:
    return invariant_silu(x)


def _gelu_module(module: nn.Module, x: torch.Tensor, weights: PackedWeights, approximate: str) -> torch.Tensor:
    return invariant_gelu(x, approximate)


def invariant_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` whose every output row has the same bits whatever the other rows are and however many
    (``weight`` plain, or packed by :class:`PackedWeights`)."""
    if not (_ONEDNN and x.device.type == "cpu" and x.dtype in ONEDNN_LINEAR_DTYPES):
        rows = x.reshape(-1, x.shape[-1])
        return _tiled_linear(rows, weight, bias)[: rows.shape[0]].view(*x.shape[:-1], weight.shape[0])
    assert _LINEAR is not None  # _ONEDNN
    if x.numel() != x.shape[-1]:  # two rows or more (or none)
        return _LINEAR(x, weight, bias, "none", [], "")
    pair = x.reshape(1, x.shape[-1]).expand(2, x.shape[-1])  # a row alone would be a matrix-vector product
    return _LINEAR(pair, weight, bias, "none", [], "")[:1].view(*x.shape[:-1], -1)


def _tiled_linear(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The rows in tiles of exactly ``ROW_TILE`` (the last one padded with zeros), one ``F.linear`` each: every
    product has one shape, whatever the number of rows."""
    tiles = -(-rows.shape[0] // ROW_TILE)
    padded = rows.new_zeros(tiles * ROW_TILE, rows.shape[1])
    padded[: rows.shape[0]] = rows
    return torch.cat([F.linear(tile, weight, bias) for tile in padded.split(ROW_TILE)])


def invariant_silu(x: torch.Tensor) -> torch.Tensor:
    """``x * sigmoid(x)`` as ``x / (1 + exp(-x))`` in float32, rounded once to ``x``'s dtype (a float32 ``x`` with no
    conversion call: two fewer torch calls per layer of a decode step)."""
    if x.dtype == torch.float32:
        return x.div(torch.neg(x).exp_().add_(1))
    xf = x.float()
    return xf.div(torch.neg(xf).exp_().add_(1)).to(x.dtype)


def invariant_gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GELU from ``erf`` (or ``tanh`` when ``approximate`` is "tanh"), in float32, rounded once to ``x``'s dtype."""
    xf = x.float()
    if approximate == "tanh":
        inner = math.sqrt(2 / math.pi) * (xf + 0.044715 * xf * xf * xf)
        out = 0.5 * xf * (1 + torch.tanh(inner))
    else:
        out = 0.5 * xf * (1 + torch.erf(xf / math.sqrt(2)))
    return out.to(x.dtype)
