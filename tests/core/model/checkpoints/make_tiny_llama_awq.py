"""Make ``tiny_llama_awq.safetensors``: the tests' tiny random Llama's linear layers quantized and packed by
AutoAWQ's own code, with AutoAWQ's dequantization of each as the reference (not run by the tests).

AutoAWQ (0.2.9, deprecated upstream, not installable beside this project's transformers) is used from its source:
``pip download autoawq==0.2.9 --no-deps``, unpack it, and put a folder holding only ``awq/utils/{module,utils,
packing_utils}.py`` and ``awq/modules/linear/gemm.py`` (with empty ``__init__.py`` files) on ``PYTHONPATH``
(its package ``__init__`` imports ``datasets``). Then, from the repository root::

    PYTHONPATH=.:/tmp/awqsrc python tests/core/model/checkpoints/make_tiny_llama_awq.py

The quantization follows AutoAWQ's ``AwqQuantizer._apply_quant`` (the layer in float16,
``pseudo_quantize_tensor`` with zero points, then ``WQLinear_GEMM.from_linear``), without its activation-aware
scaling search (which changes the weights before, not the format).
"""

from __future__ import annotations

from pathlib import Path

import torch
from awq.modules.linear.gemm import WQLinear_GEMM  # type: ignore[import-not-found]
from awq.utils.packing_utils import dequantize_gemm  # type: ignore[import-not-found]
from safetensors.torch import save_file

from tests.core.model.checkpoints.tiny_llama import decoder_linears

GROUP = 32
OUT = Path(__file__).with_name("tiny_llama_awq.safetensors")


def pseudo_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AutoAWQ's ``pseudo_quantize_tensor`` with zero points, 4 bits, groups of ``GROUP``."""
    shape = w.shape
    w = w.reshape(-1, GROUP)
    max_val, min_val = w.amax(dim=1, keepdim=True), w.amin(dim=1, keepdim=True)
    scales = (max_val - min_val).clamp(min=1e-5) / 15
    zeros = (-torch.round(min_val / scales)).clamp_(0, 15)
    w = (torch.clamp(torch.round(w / scales) + zeros, 0, 15) - zeros) * scales
    return w.reshape(shape), scales.view(shape[0], -1), zeros.view(shape[0], -1)


def main() -> None:
    tensors: dict[str, torch.Tensor] = {}
    for name, module, linear in decoder_linears():
        linear.weight.data, scales, zeros = pseudo_quantize(module.weight.data.half())
        packed = WQLinear_GEMM.from_linear(linear, 4, GROUP, scales=scales.t().contiguous(), zeros=zeros.t().contiguous())
        tensors[f"{name}.qweight"] = packed.qweight.contiguous()
        tensors[f"{name}.qzeros"] = packed.qzeros.contiguous()
        tensors[f"{name}.scales"] = packed.scales.contiguous()
        tensors[f"{name}.reference"] = dequantize_gemm(packed.qweight, packed.qzeros, packed.scales, 4, GROUP).contiguous()
    save_file(tensors, str(OUT), metadata={"group_size": str(GROUP), "made_by": "AutoAWQ 0.2.9 WQLinear_GEMM.from_linear"})
    print(f"wrote {OUT}: {len(tensors) // 4} layers")


if __name__ == "__main__":
    main()
