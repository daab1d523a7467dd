"""Pre-quantized checkpoints served as they are: AWQ and GPTQ (4-bit) on the CPU through torch's int4 kernel.

Both store each quantized linear layer as 4-bit codes ``q``, per group of inputs a zero point ``z`` (0..15) and a
scale ``s`` (float16): ``w[o, i] = (q[i, o] - z[g, o]) * s[g, o]`` with ``g = i / group``.

* **AWQ** (AutoAWQ's ``WQLinear_GEMM``, ``quant_method: awq``, ``version: gemm``): ``qweight`` int32
  ``[in, out / 8]``, eight codes of consecutive outputs per int32 in the order :data:`AWQ_ORDER`; ``qzeros``
  int32 ``[in / group, out / 8]`` packed alike; ``scales`` ``[in / group, out]``.
* **GPTQ** (AutoGPTQ's and GPTQModel's ``gptq`` checkpoint format, ``quant_method: gptq``): ``qweight`` int32
  ``[in / 8, out]``, eight codes of consecutive inputs per int32 (the lowest bits first); ``qzeros`` int32
  ``[in / group, out / 8]``, eight zeros of consecutive outputs, each stored minus one; ``scales``; ``g_idx``
  (each input's group: only ``i / group`` is served, not act-order).

torch's int4 CPU kernel computes ``(q - 8) * scale + zero`` per group of inputs, so the codes are kept,
``scale = s`` and ``zero = (8 - z) * s`` (rounded to bfloat16, as every int4 layer's): no dense copy is made of
them. The rest of the checkpoint (embeddings, norms, output layer) is loaded by transformers with the
quantization config removed, and its quantized layers are then replaced by
:class:`~amulet_core.model.quantization.Int4Linear` from the checkpoint's own tensors (transformers first gives
those layers random dense weights, freed right after: the load's peak holds the model once in ``--dtype``).
Other formats (bitsandbytes, FP8 ...) and variants are refused by :func:`accepted_checkpoint` with a message.
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
GROUPS = (32, 64, 128, 256)
"""Group sizes the int4 kernel takes."""
SERVED = ("awq", "gptq")


class UnsupportedCheckpoint(ValueError):
    """A pre-quantized checkpoint this server cannot serve (the message names its format and why)."""


@dataclass(frozen=True)
class CheckpointFormat:
    """A pre-quantized checkpoint that is served: its method (awq, gptq) and group size."""

    method: str
    group_size: int


def checkpoint_format(quantization: dict[str, Any]) -> CheckpointFormat:
    """The served format of a ``quantization_config``; UnsupportedCheckpoint for a variant not served."""
    method = str(quantization.get("quant_method", "unknown")).lower()
    bits = quantization.get("bits", quantization.get("w_bit"))
    group = quantization.get("group_size", quantization.get("q_group_size"))
    name = method.upper()
    if method == "awq":
        version = str(quantization.get("version", "gemm")).lower()
        if version != "gemm":
            raise UnsupportedCheckpoint(f"AWQ version {version!r} is not served (only AutoAWQ's 'gemm' packing).")
        if quantization.get("zero_point", True) is False:
            raise UnsupportedCheckpoint("AWQ without zero points is not served.")
    else:
        packing = str(quantization.get("checkpoint_format", "gptq")).lower()
        if packing != "gptq":
            raise UnsupportedCheckpoint(f"GPTQ checkpoint_format {packing!r} is not served (only 'gptq').")
        if quantization.get("desc_act"):
            raise UnsupportedCheckpoint("GPTQ with desc_act (act-order groups) is not served.")
    if bits != 4:
        raise UnsupportedCheckpoint(f"{name} with {bits!r} bits is not served (only 4).")
    if group not in GROUPS:
        raise UnsupportedCheckpoint(f"{name} group_size {group!r} is not served (one of {', '.join(map(str, GROUPS))}).")
    return CheckpointFormat(method, int(group))


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


def accepted_checkpoint(
    source: str, kwargs: dict[str, Any], name: str, device: torch.device, quantization: str
) -> CheckpointFormat | None:
    """The format of a pre-quantized checkpoint that can be served here, None for one that is not pre-quantized;
    ModelLoadError naming the format for every other (bitsandbytes, FP8 ..., a variant not served, a GPU, a
    ``--quantization`` other than auto or int4)."""
    found = checkpoint_quantization(source, kwargs)
    if found is None:
        return None
    method = found.get("quant_method", "unknown")
    prefix = f"Model {name!r} is a pre-quantized checkpoint (quant_method={method!r})"
    if method not in SERVED:
        raise ModelLoadError(
            f"{prefix}; of pre-quantized checkpoints Amulet Serve serves AWQ and GPTQ (4-bit) on the CPU, not "
            "bitsandbytes or FP8 yet. Serve the unquantized model quantized on load (--quantization int8 or int4, on "
            "the CPU), or a Q4_0/Q4_1 GGUF file, whose 4-bit weights stay 4-bit."
        )
    if device.type != "cpu":
        raise ModelLoadError(f"{prefix}: it is served on the CPU only (torch's int4 CPU kernel), not on {device.type}.")
    if quantization not in ("auto", "int4"):
        raise ModelLoadError(f"{prefix}: it is served as its own 4-bit weights (--quantization auto or int4, not {quantization})")
    try:
        return checkpoint_format(found)
    except UnsupportedCheckpoint as exc:
        raise ModelLoadError(f"{prefix}: {exc}") from exc


def skeleton_arguments(source: str, fmt: CheckpointFormat | None) -> dict[str, Any]:
    """The extra ``from_pretrained`` arguments that load a pre-quantized checkpoint's other weights: its config
    without the quantization (whose library is not installed); nothing for another checkpoint."""
    if fmt is None:
        return {}
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source, local_files_only=True)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return {"config": config}


def _fields(packed: torch.Tensor) -> torch.Tensor:
    """The eight 4-bit fields of every int32, lowest bits first: ``[*packed.shape, 8]`` int32 in 0..15."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    return (packed.to(torch.int32).unsqueeze(-1) >> shifts) & 15


def unpack_awq(qweight: torch.Tensor, qzeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes ``[out, in]``, zeros ``[in / group, out]``), int32 in 0..15, of AWQ's packed ``qweight`` and ``qzeros``."""
    order = torch.empty(8, dtype=torch.long)
    order[list(AWQ_ORDER)] = torch.arange(8)  # output j of the eight is field order[j]

    def unpack(packed: torch.Tensor) -> torch.Tensor:
        return _fields(packed)[..., order].reshape(packed.shape[0], -1)

    return unpack(qweight).t().contiguous(), unpack(qzeros)


def unpack_gptq(qweight: torch.Tensor, qzeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes ``[out, in]``, zeros ``[in / group, out]``), int32 in 0..15, of GPTQ's packed ``qweight`` (along the
    inputs) and ``qzeros`` (along the outputs, each stored minus one)."""
    codes = _fields(qweight).permute(0, 2, 1).reshape(-1, qweight.shape[1])  # [in, out]
    zeros = (_fields(qzeros).reshape(qzeros.shape[0], -1) + 1) & 15
    return codes.t().contiguous(), zeros


def int4_layer(fmt: CheckpointFormat, tensors: dict[str, torch.Tensor], name: str, bias: torch.Tensor | None) -> Int4Linear:
    """The layer ``name`` of a checkpoint as an int4 layer of the CPU kernel (its codes kept as they are)."""
    unpack = unpack_awq if fmt.method == "awq" else unpack_gptq
    codes, zeros = unpack(tensors[f"{name}.qweight"], tensors[f"{name}.qzeros"])
    scales = tensors[f"{name}.scales"]
    out_features, in_features = codes.shape
    group = fmt.group_size
    if scales.shape != (in_features // group, out_features) or zeros.shape != scales.shape:
        raise UnsupportedCheckpoint(f"{name}: tensors of unexpected shapes (scales {tuple(scales.shape)}).")
    g_idx = tensors.get(f"{name}.g_idx")
    if g_idx is not None and not torch.equal(g_idx.long(), torch.arange(in_features) // group):
        raise UnsupportedCheckpoint(f"{name}: its g_idx orders the groups (act-order), which is not served.")
    step = scales.float()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    scales_and_zeros = torch.stack([step, (8 - zeros.float()) * step], dim=-1).to(COMPUTE_DTYPE).contiguous()
    return Int4Linear(packed, scales_and_zeros, torch.Size((out_features, in_features)), bias, group=group)


QUANTIZED_PARTS = ("qweight", "qzeros", "scales", "g_idx")
"""The tensors a quantized layer is stored as (its bias, if any, transformers loads with the rest)."""


def read_quantized_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """The quantized layers' tensors (:data:`QUANTIZED_PARTS`) of the checkpoint's safetensors files (one file, or
    the shards its index names), read alone: transformers has already read the others."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    else:
        files = [p.name for p in sorted(folder.glob("*.safetensors"))]
    if not files:
        raise UnsupportedCheckpoint(f"no .safetensors files in {folder}: a pre-quantized checkpoint is read from safetensors.")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        with safe_open(str(folder / name), framework="pt") as opened:
            for key in opened.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if key.rpartition(".")[2] in QUANTIZED_PARTS:
                    tensors[key] = opened.get_tensor(key)
    return tensors


def load_quantized_layers(model: nn.Module, folder: Path, fmt: CheckpointFormat) -> QuantizationReport:
    """Replace every linear layer of ``model`` that the checkpoint in ``folder`` stores quantized by its int4 layer;
    the report counts them and their bytes. UnsupportedCheckpoint when the tensors are not what the format says."""
    if not INT4_KERNEL:
        raise UnsupportedCheckpoint(f"this torch ({torch.__version__}) has no int4 CPU kernel.")
    tensors = read_quantized_tensors(folder)
    layers = packed_bytes = dense_bytes = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or f"{name}.qweight" not in tensors:
            continue
        layer = int4_layer(fmt, tensors, name, module.bias)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        layers += 1
        dense_bytes += module.weight.numel() * COMPUTE_DTYPE.itemsize
        packed_bytes += sum(b.numel() * b.element_size() for b in layer.buffers())
    if layers == 0:
        raise UnsupportedCheckpoint(f"the {fmt.method.upper()} checkpoint has no qweight tensor that matches a linear layer.")
    logger.info(
        "%s checkpoint: %d linear layers kept 4-bit (group %d), %.1f MiB",
        fmt.method.upper(), layers, fmt.group_size, packed_bytes / (1 << 20),
    )  # fmt: skip
    return QuantizationReport(fmt.method, layers, layers, dense_bytes, packed_bytes)
