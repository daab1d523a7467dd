"""Weight-only quantization of a loaded model's linear layers (``--quantization``), on the CPU.

Choices (:data:`QUANTIZATIONS`):

* ``none``: the weights stay in the model's dtype.
* ``int8``: every linear layer but the output one gets int8 weights, one scale per output (symmetric, the
  largest magnitude maps to 127), multiplied by torch's int8 weight-only CPU kernel
  (``torch._weight_int8pack_mm``): half the bytes of bfloat16.
* ``int4``: groups of :data:`GROUP` inputs get 16 evenly spaced levels from their lowest to their highest value
  (round to nearest), multiplied by torch's int4 CPU kernel (``_weight_int4pack_mm_for_cpu``, the kernel of
  torchao's int4 weight-only CPU path): a quarter of the bytes of bfloat16. A weight that is already 4-bit
  (a Q4_0 or Q4_1 GGUF model's, dequantized by transformers) gets its own codes back exactly: its group's
  lowest value is the GGUF's ``m``, its step ``d``, and every weight lies on a level.
* ``int4-q16``: the same 4-bit groups multiplied as integers with the inputs in 16-bit blocks
  (:mod:`amulet_core.model.q4_linear`, a C kernel compiled at start): closer to the float32 product than the
  bfloat16 inputs of ``int4``, and faster on an AVX2 CPU.
* ``auto`` (the default): for a GGUF model on a CPU in bfloat16, or in float32 where ``--dtype auto`` chose it
  (a CPU without native bfloat16), ``int4-q16`` for the layers that are already 4-bit (exact weights), or
  ``int4`` where the kernel does not build (no C compiler: a warning says so); else ``none``. A float32 model
  asked for by name keeps its exact float32 products.

The output layer (tied to the embeddings in most small models) and the embeddings keep their dtype, as in
vLLM's and llama.cpp's usual formats. A quantized layer replaces its ``nn.Linear`` (the dense weight is freed),
so the engine's packed copy for oneDNN (:mod:`amulet_core.engine.invariant_ops`) does not hold it either.

Both kernels run their fast path in bfloat16 (measured with torch 2.13 on this project's AVX512-BF16 CPU, one
thread, a 1,536 x 576 layer: int8 81 us and int4 71 us for one row against 144 us for the bfloat16 product, but
15 to 60 times slower in float32), so a quantized layer computes in bfloat16 whatever the model's dtype and
returns the model's dtype. A row's bits do not depend on the other rows (1 to 700 rows compared), so the
deterministic forward stays batch-invariant. From about 16 rows a step they are slower than the bfloat16
product (a 512-token prefill chunk about 3 times), which is the price of reading fewer bytes per decoded token.

On a GPU neither kernel applies: ``int8`` and ``int4`` are refused there with a message, ``auto`` is ``none``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from amulet_core.model.four_bit import GROUP, layer_codes
from amulet_core.model.q4_linear import LANES, Q4Linear, half_blocks, load_q4_library
from amulet_core.model.rowwise_linear import RowwiseLinear
from amulet_core.native.build import Library

logger = logging.getLogger(__name__)

QUANTIZATIONS = ("auto", "none", "int8", "int4", "int4-q16")
"""The ``--quantization`` choices."""

COMPUTE_DTYPE = torch.bfloat16
"""The activations' dtype inside a quantized layer (the kernels' fast path)."""

INT4_KERNEL = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
    torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"
)
INT8_KERNEL = hasattr(torch, "_weight_int8pack_mm")
_INT4_MATMUL = torch.ops.aten._weight_int4pack_mm_for_cpu.default if INT4_KERNEL else None
"""The kernel's overload itself: calling it skips the overload resolution (about 3 us a call, 210 calls a SmolLM2
step)."""


class QuantizationError(ValueError):
    """A quantization that cannot run with this model, device or torch (the message names the combination)."""


@dataclass(frozen=True)
class QuantizationReport:
    """What :func:`quantize_model` did: the method applied and how many bytes the linear weights now take."""

    method: str
    layers: int
    """Linear layers now quantized."""
    exact_layers: int
    """Of those, int4 layers whose weights were already 4-bit (their codes recovered exactly)."""
    dense_bytes: int
    """Bytes the quantized layers' weights took before."""
    quantized_bytes: int
    """Bytes they take now (codes, scales and zeros)."""


class Int8Linear(RowwiseLinear):
    """``nn.Linear`` with int8 weights and one scale per output: ``y = x @ (q * scale).T + bias``."""

    codes: torch.Tensor
    scales: torch.Tensor

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = codes.shape[1], codes.shape[0]
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    compute_dtype = COMPUTE_DTYPE

    def product(self, rows: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(rows, self.codes, self.scales)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Int4Linear(RowwiseLinear):
    """``nn.Linear`` with int4 codes in groups of ``group`` inputs: ``w = (q - 8) * scale + zero``."""

    packed: torch.Tensor
    scales_and_zeros: torch.Tensor

    def __init__(
        self,
        packed: torch.Tensor,
        scales_and_zeros: torch.Tensor,
        shape: torch.Size,
        bias: torch.Tensor | None,
        group: int = GROUP,
    ):
        super().__init__()
        self.out_features, self.in_features = shape
        self.group = group
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    compute_dtype = COMPUTE_DTYPE

    def product(self, rows: torch.Tensor) -> torch.Tensor:
        assert _INT4_MATMUL is not None  # an Int4Linear is only made where the kernel exists
        return _INT4_MATMUL(rows, self.packed, self.group, self.scales_and_zeros)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 group={self.group}"


def int4_linear(layer: nn.Linear, exact_only: bool) -> tuple[Int4Linear, bool] | None:
    """(the int4 form of a linear layer, whether its weight was already 4-bit: :func:`layer_codes`), or None when
    its weight does not fit the kernel (or, with ``exact_only``, is not 4-bit)."""
    found = layer_codes(layer, exact_only)
    if found is None:
        return None
    (codes, step, lowest), exact = found
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    except RuntimeError:  # a shape the kernel does not take (outputs not a multiple of 16)
        return None
    # The kernel computes (q - 8) * scale + zero: lowest + step * q is scale step, zero lowest + 8 step.
    scales_and_zeros = torch.stack([step.t(), (lowest + 8 * step).t()], dim=-1).to(COMPUTE_DTYPE).contiguous()
    return Int4Linear(packed, scales_and_zeros, layer.weight.shape, layer.bias), exact


def q4_layer(layer: nn.Linear, exact_only: bool, library: Library) -> tuple[Q4Linear, bool] | None:
    """(the ``int4-q16`` form of a linear layer, whether its weight was already 4-bit), as :func:`int4_linear`."""
    found = None if layer.out_features % LANES else layer_codes(layer, exact_only)
    if found is None:
        return None
    (codes, steps, lowest), exact = found
    return Q4Linear.of(codes, *half_blocks(steps, lowest), library, layer.bias), exact


def int8_linear(layer: nn.Linear) -> Int8Linear:
    """The int8 form of a linear layer: per output, the largest magnitude maps to 127 (its scale rounded to
    bfloat16 first, so the codes are rounded against the scale the kernel multiplies by)."""
    weight = layer.weight.detach().float()
    scales = (weight.abs().amax(1) / 127).to(COMPUTE_DTYPE)
    safe = torch.where(scales > 0, scales.float(), torch.ones_like(scales, dtype=torch.float32))
    codes = (weight / safe.unsqueeze(1)).round().clamp(-127, 127).to(torch.int8).contiguous()
    return Int8Linear(codes, scales, layer.bias)


def layer_bytes(out_features: int, in_features: int, method: str, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes a linear layer's weight takes with ``method`` (``none``: in ``dtype``; without a bias), the sizes
    :func:`int8_linear` and :func:`int4_linear` allocate: for sizing a model from its shapes alone."""
    weights = out_features * in_features
    scale = COMPUTE_DTYPE.itemsize
    if method == "int8":
        return weights + out_features * scale
    if method == "int4":
        return weights // 2 + (in_features // GROUP) * out_features * 2 * scale
    if method == "int4-q16":
        return weights // 2 + (in_features // GROUP) * out_features * 2 * 2  # float16 steps and lowest values
    return weights * dtype.itemsize


def resolve_quantization(method: str, device: torch.device, dtype: torch.dtype, gguf: bool, dtype_chosen: bool = False) -> str:
    """The method :func:`quantize_model` applies for ``method`` on this device and dtype (``gguf``: the model is a
    GGUF file, the only source of already 4-bit weights; ``dtype_chosen``: ``dtype`` is ``--dtype auto``'s choice,
    not the user's); QuantizationError for a combination that cannot run (a GPU, or a torch without the kernel)."""
    if method not in QUANTIZATIONS:
        raise QuantizationError(f"--quantization must be one of {', '.join(QUANTIZATIONS)}, got {method!r}.")
    if method == "auto":
        computes = dtype == torch.bfloat16 or (dtype == torch.float32 and dtype_chosen)
        return "int4-q16" if gguf and device.type == "cpu" and computes else "none"
    if method == "none":
        return method
    if device.type != "cpu":
        raise QuantizationError(
            f"--quantization {method} runs on the CPU only (a weight-only {method} CPU kernel); on {device.type} "
            "serve the model unquantized (--quantization none)."
        )
    if method == "int4-q16":
        return method
    if not (INT4_KERNEL if method == "int4" else INT8_KERNEL):
        raise QuantizationError(f"--quantization {method}: this torch ({torch.__version__}) has no {method} CPU kernel.")
    return method


def quantize_model(model: nn.Module, method: str, exact_only: bool = False, fallback: bool = False) -> QuantizationReport:
    """Replace ``model``'s linear layers (not the output layer, not a layer sharing its weight) by their
    ``method`` form (``int8``, ``int4`` or ``int4-q16``; ``none`` changes nothing). ``exact_only`` (int4, int4-q16):
    only the layers whose weights are already 4-bit. Layers whose shape a kernel does not take keep their weights.
    ``int4-q16`` where its kernel does not build: QuantizationError, or with ``fallback`` a warning and ``int4``
    (``none`` without torch's int4 kernel)."""
    library = None
    if method == "int4-q16":
        library, why = load_q4_library()
        if library is None and not fallback:
            raise QuantizationError(f"--quantization int4-q16: {why}")
        if library is None:
            method = "int4" if INT4_KERNEL else "none"
            logger.warning("quantization %s instead of int4-q16: %s", method, why)
    if method == "none":
        return QuantizationReport(method, 0, 0, 0, 0)
    output_of = getattr(model, "get_output_embeddings", None)
    output = output_of() if callable(output_of) else None
    counts: dict[int, int] = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            counts[weight.data_ptr()] = counts.get(weight.data_ptr(), 0) + 1
    layers = exact = dense = packed = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear) or child is output or counts.get(child.weight.data_ptr(), 0) > 1:
                continue
            if method == "int8":
                replacement: nn.Module = int8_linear(child)
            else:
                found = int4_linear(child, exact_only) if library is None else q4_layer(child, exact_only, library)
                if found is None:
                    continue
                replacement, was_4bit = found
                exact += was_4bit
            dense += child.weight.numel() * child.weight.element_size()
            packed += sum(b.numel() * b.element_size() for b in replacement.buffers())
            setattr(parent, name, replacement)
            layers += 1
    if layers:
        logger.info(
            "quantization %s: %d linear layers (%d already 4-bit), %.1f MiB of weights now %.1f MiB",
            method, layers, exact, dense / (1 << 20), packed / (1 << 20),
        )  # fmt: skip
        if library is not None:
            logger.info("quantization int4-q16: its kernel %s", library.describe())
    return QuantizationReport(method, layers, exact, dense, packed)
