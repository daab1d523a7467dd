"""Pre-quantized checkpoints served as they are: AWQ (4-bit, GEMM packing) on the CPU through torch's int4 kernel.

An AWQ checkpoint (AutoAWQ's ``WQLinear_GEMM`` format, ``quant_method: awq``, ``version: gemm``) stores each
quantized linear layer as ``qweight`` (int32 ``[in, out / 8]``: eight 4-bit codes of consecutive outputs per
int32, in the order :data:`AWQ_ORDER`), ``qzeros`` (int32 ``[in / group, out / 8]``, packed alike) and ``scales``
(float16 ``[in / group, out]``): ``w[o, i] = (q[i, o] - z[i / group, o]) * s[i / group, o]``. torch's int4 CPU
kernel computes ``(q - 8) * scale + zero`` per group of inputs, so the codes are kept, ``scale = s`` and
``zero = (8 - z) * s`` (rounded to bfloat16, as every int4 layer's): no dense copy is ever made of them.

The rest of the checkpoint (embeddings, norms, output layer) is loaded by transformers with the quantization
config removed; its quantized layers are then replaced by :class:`~amulet_core.model.quantization.Int4Linear`
from the checkpoint's own tensors. (transformers first gives those layers random dense weights, freed right
after: the load's peak holds the model once in ``--dtype``.) GPTQ, bitsandbytes and FP8 checkpoints are refused
by the loader with a message.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from amulet_core.errors import ModelLoadError
from amulet_core.model.quantization import COMPUTE_DTYPE, INT4_KERNEL, Int4Linear, QuantizationReport

logger = logging.getLogger(__name__)

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
"""Which of eight consecutive outputs each 4-bit field of an AWQ int32 holds (field ``k`` holds ``AWQ_ORDER[k]``)."""
AWQ_GROUPS = (32, 64, 128, 256)
"""Group sizes the int4 kernel takes."""


class UnsupportedCheckpoint(ValueError):
    """A pre-quantized checkpoint this server cannot serve (the message names its format and why)."""


@dataclass(frozen=True)
class AwqFormat:
    group_size: int
    modules_to_not_convert: tuple[str, ...] = ()


def awq_format(quantization: dict[str, Any]) -> AwqFormat:
    """The AWQ settings of a ``quantization_config``; UnsupportedCheckpoint for a variant not served."""
    version = str(quantization.get("version", "gemm")).lower()
    bits, group = (
        quantization.get("bits", quantization.get("w_bit")),
        quantization.get("group_size", quantization.get("q_group_size")),
    )
    if version != "gemm":
        raise UnsupportedCheckpoint(f"AWQ version {version!r} is not served (only AutoAWQ's 'gemm' packing).")
    if bits != 4:
        raise UnsupportedCheckpoint(f"AWQ with {bits!r} bits is not served (only 4).")
    if group not in AWQ_GROUPS:
        raise UnsupportedCheckpoint(f"AWQ group_size {group!r} is not served (one of {', '.join(map(str, AWQ_GROUPS))}).")
    if quantization.get("zero_point", True) is False:
        raise UnsupportedCheckpoint("AWQ without zero points is not served.")
    skipped = quantization.get("modules_to_not_convert") or ()
    return AwqFormat(int(group), tuple(str(m) for m in skipped))


def checkpoint_quantization(source: str, kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """The ``quantization_config`` of a local checkpoint folder's config.json, if it has one (a GGUF file or a cached
    id: None; transformers reads a cached id's config and fails clearly on a quantizer it lacks)."""
    if "gguf_file" in kwargs:
        return None
    config_file = Path(source) / "config.json"
    if not config_file.is_file():
        return None
    try:
        quantization = json.loads(config_file.read_text(encoding="utf-8")).get("quantization_config")
    except (OSError, ValueError):
        return None  # from_pretrained reports an unreadable config
    return quantization if isinstance(quantization, dict) else None


def accepted_awq(source: str, kwargs: dict[str, Any], name: str, device: torch.device, quantization: str) -> AwqFormat | None:
    """The AWQ format of a pre-quantized checkpoint that can be served here, None for a checkpoint that is not
    pre-quantized; ModelLoadError naming the format for every other (GPTQ, bitsandbytes, FP8 ..., an AWQ variant
    not served, a GPU, a ``--quantization`` other than auto or int4)."""
    found = checkpoint_quantization(source, kwargs)
    if found is None:
        return None
    method = found.get("quant_method", "unknown")
    prefix = f"Model {name!r} is a pre-quantized checkpoint (quant_method={method!r})"
    if method != "awq":
        raise ModelLoadError(
            f"{prefix}; of pre-quantized checkpoints Amulet Serve serves AWQ (4-bit, gemm) on the CPU, not GPTQ, "
            "bitsandbytes or FP8 yet. Serve the unquantized model quantized on load (--quantization int8 or int4, on "
            "the CPU), or a Q4_0/Q4_1 GGUF file, whose 4-bit weights stay 4-bit."
        )
    if device.type != "cpu":
        raise ModelLoadError(f"{prefix}: AWQ is served on the CPU only (torch's int4 CPU kernel), not on {device.type}.")
    if quantization not in ("auto", "int4"):
        raise ModelLoadError(
            f"{prefix}: it is served as its own 4-bit weights (--quantization auto or int4, not {quantization})."
        )
    try:
        return awq_format(found)
    except UnsupportedCheckpoint as exc:
        raise ModelLoadError(f"{prefix}: {exc}") from exc


def awq_skeleton(source: str, fmt: AwqFormat | None) -> dict[str, Any]:
    """The extra ``from_pretrained`` arguments that load an AWQ checkpoint's other weights: its config without the
    quantization (whose library is not installed); nothing for another checkpoint."""
    if fmt is None:
        return {}
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source, local_files_only=True)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return {"config": config}


def unpack_awq(qweight: torch.Tensor, qzeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes ``[out, in]``, zeros ``[in / group, out]``), int32 in 0..15, of AWQ's packed ``qweight`` and ``qzeros``."""

    def unpack(packed: torch.Tensor) -> torch.Tensor:
        shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
        fields = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & 15  # [rows, out / 8, 8]: field k
        order = torch.empty(8, dtype=torch.long)
        order[list(AWQ_ORDER)] = torch.arange(8)  # output j of the eight is field order[j]
        return fields[..., order].reshape(packed.shape[0], -1)

    return unpack(qweight).t().contiguous(), unpack(qzeros)


def awq_linear(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, group: int
) -> Int4Linear:
    """An AWQ layer as an int4 layer of the CPU kernel (its codes kept as they are)."""
    codes, zeros = unpack_awq(qweight, qzeros)
    out_features, in_features = codes.shape
    if scales.shape != (in_features // group, out_features) or zeros.shape != scales.shape:
        raise UnsupportedCheckpoint(
            f"AWQ tensors of unexpected shapes: qweight {tuple(qweight.shape)}, scales {tuple(scales.shape)}."
        )
    step = scales.float()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    scales_and_zeros = torch.stack([step, (8 - zeros.float()) * step], dim=-1).to(COMPUTE_DTYPE).contiguous()
    return Int4Linear(packed, scales_and_zeros, torch.Size((out_features, in_features)), bias, group=group)


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint's safetensors files (one file, or the shards its index names)."""
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    else:
        files = [p.name for p in sorted(folder.glob("*.safetensors"))]
    if not files:
        raise UnsupportedCheckpoint(f"no .safetensors files in {folder}: an AWQ checkpoint is read from safetensors.")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        tensors.update(load_file(str(folder / name)))
    return tensors


def load_awq_layers(model: nn.Module, folder: Path, fmt: AwqFormat) -> QuantizationReport:
    """Replace every linear layer of ``model`` that the checkpoint in ``folder`` stores in AWQ form by its int4
    layer; the report counts them and their bytes."""
    if not INT4_KERNEL:
        raise UnsupportedCheckpoint(f"this torch ({torch.__version__}) has no int4 CPU kernel for an AWQ checkpoint.")
    tensors = read_tensors(folder)
    layers = packed_bytes = dense_bytes = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or f"{name}.qweight" not in tensors:
            continue
        layer = awq_linear(
            tensors[f"{name}.qweight"], tensors[f"{name}.qzeros"], tensors[f"{name}.scales"], module.bias, fmt.group_size
        )
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        layers += 1
        dense_bytes += module.weight.numel() * COMPUTE_DTYPE.itemsize
        packed_bytes += sum(b.numel() * b.element_size() for b in layer.buffers())
    if layers == 0:
        raise UnsupportedCheckpoint("the AWQ checkpoint has no qweight tensor that matches a linear layer of its model.")
    logger.info(
        "AWQ checkpoint: %d linear layers kept 4-bit (group %d), %.1f MiB", layers, fmt.group_size, packed_bytes / (1 << 20)
    )
    return QuantizationReport("awq", layers, layers, dense_bytes, packed_bytes)
