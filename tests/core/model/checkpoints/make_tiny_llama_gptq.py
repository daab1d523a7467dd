"""Make ``tiny_llama_gptq.safetensors``: the tests' tiny random Llama's linear layers quantized and packed by
AutoGPTQ's own ``QuantLinear.pack`` (the GPTQ v1 checkpoint format), with AutoGPTQ's own dequantization of each
(its torch fallback forward, applied to the identity) as the reference (not run by the tests).

AutoGPTQ (0.7.1, archived upstream) is used from its wheel: ``pip download auto-gptq==0.7.1 --no-deps``, unzip
it, and put a folder holding only ``auto_gptq/nn_modules/qlinear/{__init__,qlinear_cuda_old}.py`` (with empty
``auto_gptq/__init__.py`` and ``auto_gptq/nn_modules/__init__.py``) on ``PYTHONPATH``. Then, from the repository
root::

    PYTHONPATH=.:/tmp/gptqsrc python tests/core/model/checkpoints/make_tiny_llama_gptq.py

The weights are first rounded as GPTQ's quantizer rounds them (asymmetric, 4 bits, groups of ``GROUP``, no act
order), without its error-compensating updates (which change the weights before, not the format).
"""

from __future__ import annotations

from pathlib import Path

import torch
from auto_gptq.nn_modules.qlinear.qlinear_cuda_old import QuantLinear  # type: ignore[import-not-found]
from safetensors.torch import save_file

from tests.core.model.checkpoints.tiny_llama import decoder_linears

GROUP = 32
OUT = Path(__file__).with_name("tiny_llama_gptq.safetensors")


def rounded(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the weight on its grid, scales and zeros ``[out, groups]``): GPTQ's asymmetric 4-bit quantizer per group."""
    out, inputs = w.shape
    groups = w.reshape(out, inputs // GROUP, GROUP)
    xmin, xmax = groups.amin(-1).clamp(max=0), groups.amax(-1).clamp(min=0)
    scale = (xmax - xmin) / 15
    zero = torch.round(-xmin / scale)
    q = torch.clamp(torch.round(groups / scale[..., None]) + zero[..., None], 0, 15)
    return (scale[..., None] * (q - zero[..., None])).reshape(out, inputs), scale, zero


def main() -> None:
    tensors: dict[str, torch.Tensor] = {}
    for name, module, linear in decoder_linears():
        weight, scale, zero = rounded(module.weight.data.float())
        linear.weight.data = weight.half()
        layer = QuantLinear(4, GROUP, module.in_features, module.out_features, False)
        g_idx = torch.tensor([i // GROUP for i in range(module.in_features)], dtype=torch.int32)
        layer.pack(linear, scale.half(), zero.half(), g_idx)
        layer.g_idx = g_idx
        with torch.no_grad():
            reference = layer(torch.eye(module.in_features, dtype=torch.float16))  # [in, out]
        for part in ("qweight", "qzeros", "scales", "g_idx"):
            tensors[f"{name}.{part}"] = getattr(layer, part).contiguous()
        tensors[f"{name}.reference"] = reference.contiguous()
    save_file(tensors, str(OUT), metadata={"group_size": str(GROUP), "made_by": "AutoGPTQ 0.7.1 QuantLinear.pack"})
    print(f"wrote {OUT}: {len(tensors) // 5} layers")


if __name__ == "__main__":
    main()
