"""The forward pass of a packed step: transformers' own for any model, or the same operations without its call chain.

Every engine step runs the model once over its packed tokens (:class:`~amulet_core.engine.paged_attention.PackedBatch`).
For most models that is transformers' forward, whose modules add a Python call chain to each of the step's tensor
operations: module ``__call__`` with its hooks, keyword arguments passed down three levels, deprecation wrappers,
the attention-function lookup, output records. For the Llama family (Llama, Mistral, Qwen2, Qwen3), whose decoder
layers are the same few operations, :class:`LlamaFamilyForward` runs those operations itself in a loop over the
layers, calling the forward of the model's own linear and activation modules directly, and writing out the norms'
and the rotary embedding's (:mod:`amulet_core.engine.layer_kernels`: torch's operations without conversions to a
dtype a tensor has, temporaries reused, the rotation's negation moved onto the sine; or, on a CPU in float32, one
compiled call each, the residual addition in the norm's): the same products and sums, in the same order, on the
same dtypes as transformers' modeling code, so the same bits
(``tests/engine/test_packed_forward.py`` compares logits and the written KV cache bit for bit, each family, float32
and bfloat16, deterministic or not). Int4 projections of one input run fused (:mod:`amulet_core.model.int4_fusion`).
``python -m benchmarks.packed_forward`` measures both forwards on the embedded SmolLM2.

:func:`packed_forward` picks one: the family's when every module is one it knows, unpatched and without hooks (a
module with a forward hook, an offloading wrapper or a hub kernel keeps transformers' forward, which honours them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from amulet_core.engine.layer_kernels import TorchLayerOps
from amulet_core.engine.paged_attention import PackedBatch, paged_attention_forward
from amulet_core.model.int4_fusion import fuse_int4


class PackedForward(Protocol):
    """Logits ``[1, kept, vocab]`` of a packed step: ``input_ids`` and ``position_ids`` ``[1, N]``, the kept
    positions ``logits_to_keep`` (a 1-D tensor of packed indices, or an int: that many last ones, 0 for all)."""

    def __call__(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, logits_to_keep: torch.Tensor | int, batch: PackedBatch
    ) -> torch.Tensor: ...


class TransformersForward:
    """transformers' own forward of the model, with the batch handed to the paged attention function."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, logits_to_keep: torch.Tensor | int, batch: PackedBatch
    ) -> torch.Tensor:
        out = self.model(
            input_ids=input_ids,
            position_ids=position_ids,
            logits_to_keep=logits_to_keep,
            use_cache=False,
            amulet_batch=batch,
        )
        return out.logits


FAMILIES = {
    "LlamaForCausalLM": "Llama",
    "MistralForCausalLM": "Mistral",
    "Qwen2ForCausalLM": "Qwen2",
    "Qwen3ForCausalLM": "Qwen3",
}
"""The model classes :class:`LlamaFamilyForward` runs, and the prefix of their modules' class names."""


@dataclass(frozen=True)
class _Layer:
    """One decoder layer's modules and constants, read once. The linear layers and the activation are called
    through ``forward`` (their own, or the one :mod:`amulet_core.engine.invariant_ops` installed), skipping only
    ``nn.Module.__call__``, which has no hooks to run for them."""

    attention: nn.Module
    input_norm: nn.Module
    q_proj: nn.Module
    k_proj: nn.Module
    v_proj: nn.Module
    o_proj: nn.Module
    q_norm: nn.Module | None
    k_norm: nn.Module | None
    post_norm: nn.Module
    gate_proj: nn.Module
    up_proj: nn.Module
    down_proj: nn.Module
    act: nn.Module
    head_dim: int
    scaling: float
    window: int | None
    qkv: nn.Module | None = None
    """The query, key and value projections as one int4 layer (:func:`~amulet_core.model.int4_fusion.fuse_int4`)."""
    qkv_sizes: tuple[int, int, int] = (0, 0, 0)
    gate_up: nn.Module | None = None
    """The gate and up projections as one int4 layer."""
    gate_size: int = 0


def kept_rows(hidden: torch.Tensor, logits_to_keep: torch.Tensor | int) -> torch.Tensor:
    """transformers' ``slice_logits_to_keep`` of ``[1, N, hidden]`` for a 1-D tensor or an int."""
    if isinstance(logits_to_keep, int):
        return hidden[:, -logits_to_keep:, :] if logits_to_keep else hidden
    return hidden[:, logits_to_keep, :]


class LlamaFamilyForward:
    """The Llama family's forward over a packed step (see the module's docstring)."""

    def __init__(self, model: nn.Module, layers: list[_Layer], ops: TorchLayerOps | None = None) -> None:
        inner: Any = getattr(model, "model")  # noqa: B009
        self.embed = inner.embed_tokens
        self.rotary = inner.rotary_emb
        self.norm = inner.norm
        self.head = getattr(model, "lm_head")  # noqa: B009
        self.layers = layers
        self.ops = ops or TorchLayerOps()
        """The norms (each with the residual addition before it) and rotations: torch's operations or one compiled
        call each (:mod:`amulet_core.engine.layer_kernels`), the same bits."""
        self.next_norms = [layer.input_norm for layer in layers[1:]] + [self.norm]
        """The norm each layer ends with: the next layer's input norm, the model's last norm after the last layer."""

    def __call__(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, logits_to_keep: torch.Tensor | int, batch: PackedBatch
    ) -> torch.Tensor:
        return self.head(self.hidden(input_ids, position_ids, logits_to_keep, batch))

    def hidden(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, logits_to_keep: torch.Tensor | int, batch: PackedBatch
    ) -> torch.Tensor:
        """The kept positions' hidden states after the last norm, ``[1, kept, hidden]``: what the output layer reads."""
        ops = self.ops
        hidden = self.embed.forward(input_ids)
        cos, sin = self.rotary(hidden, position_ids)
        cos, lead = cos.unsqueeze(1), sin.shape[-1] - sin.shape[-1] // 2
        signed_sin = torch.cat((-sin[..., :lead], sin[..., lead:]), dim=-1).unsqueeze(1)
        shape = hidden.shape[:-1]
        # Each layer ends with the next one's norm (self.next_norms), and each norm with the residual addition
        # before it: one call where the ops have kernels.
        hidden, x = ops.add_norm(self.layers[0].input_norm, hidden)
        for layer, next_norm in zip(self.layers, self.next_norms, strict=True):
            heads = (*shape, -1, layer.head_dim)
            if layer.qkv is not None:  # the queries' and keys' rotations in one pass over both
                qkv = layer.qkv.forward(x)
                rotated = layer.qkv_sizes[0] + layer.qkv_sizes[1]
                qk = qkv[..., :rotated].view(heads).transpose(1, 2)
                qk = ops.rotate(qk, cos, signed_sin)
                query_heads = layer.qkv_sizes[0] // layer.head_dim
                q, k = qk[:, :query_heads], qk[:, query_heads:]
                v = qkv[..., rotated:].view(heads).transpose(1, 2)
            else:
                q, k, v = layer.q_proj.forward(x), layer.k_proj.forward(x), layer.v_proj.forward(x)
                q, k, v = q.view(heads), k.view(heads), v.view(heads)
                if layer.q_norm is not None and layer.k_norm is not None:
                    q, k = ops.add_norm(layer.q_norm, q)[1], ops.add_norm(layer.k_norm, k)[1]
                q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
                q, k = ops.rotate(q, cos, signed_sin), ops.rotate(k, cos, signed_sin)
            out, _ = paged_attention_forward(
                layer.attention, q, k, v, None, scaling=layer.scaling, sliding_window=layer.window, amulet_batch=batch
            )
            hidden, x = ops.add_norm(layer.post_norm, layer.o_proj.forward(out.reshape(*shape, -1).contiguous()), hidden)
            if layer.gate_up is not None:
                both = layer.gate_up.forward(x)
                gate, up = both[..., : layer.gate_size].contiguous(), both[..., layer.gate_size :]  # act's input dense
            else:
                gate, up = layer.gate_proj.forward(x), layer.up_proj.forward(x)
            hidden, x = ops.add_norm(next_norm, layer.down_proj.forward(layer.act.forward(gate) * up), hidden)
        return kept_rows(x, logits_to_keep)


def packed_forward(model: nn.Module, ops: TorchLayerOps | None = None) -> PackedForward:
    """:class:`LlamaFamilyForward` for a model it runs exactly (with ``ops``' norms and rotations, torch's
    operations by default), else :class:`TransformersForward`."""
    layers = _family_layers(model)
    return TransformersForward(model) if layers is None else LlamaFamilyForward(model, layers, ops)


def _family_layers(model: nn.Module) -> list[_Layer] | None:
    prefix = FAMILIES.get(type(model).__name__)
    inner = getattr(model, "model", None)
    if prefix is None or inner is None or model.training or not _plain(model, "ForCausalLM", prefix):
        return None
    config = getattr(model, "config")  # noqa: B009
    if not isinstance(getattr(inner, "embed_tokens", None), nn.Embedding) or getattr(config, "pretraining_tp", 1) != 1:
        return None
    if not (_plain(inner, "Model", prefix) and _plain(inner.norm, "RMSNorm", prefix) and _hookless(inner.rotary_emb)):
        return None
    if not _hookless(inner.embed_tokens) or not _hookless(getattr(model, "lm_head", None)):
        return None
    layers = []
    for decoder in inner.layers:
        layer = _layer(decoder, prefix, config)
        if layer is None:
            return None
        layers.append(layer)
    return layers


def _layer(decoder: Any, prefix: str, config: Any) -> _Layer | None:
    attention: Any = getattr(decoder, "self_attn", None)
    mlp: Any = getattr(decoder, "mlp", None)
    if not (_plain(decoder, "DecoderLayer", prefix) and _plain(attention, "Attention", prefix) and _plain(mlp, "MLP", prefix)):
        return None
    norms = [decoder.input_layernorm, decoder.post_attention_layernorm]
    q_norm, k_norm = getattr(attention, "q_norm", None), getattr(attention, "k_norm", None)
    if prefix == "Qwen3":
        norms += [q_norm, k_norm]
    elif q_norm is not None or k_norm is not None:
        return None
    linears = [attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
    if not all(_plain(n, "RMSNorm", prefix) for n in norms) or not all(_hookless(m) for m in [*linears, mlp.act_fn]):
        return None
    # Qwen2/Qwen3 keep their window on the attention module (None on full-attention layers); Mistral reads its config.
    window = attention.sliding_window if prefix in ("Qwen2", "Qwen3") else None
    if prefix == "Mistral":
        window = getattr(config, "sliding_window", None)
    return _Layer(
        attention,
        decoder.input_layernorm,
        attention.q_proj,
        attention.k_proj,
        attention.v_proj,
        attention.o_proj,
        q_norm if prefix == "Qwen3" else None,
        k_norm if prefix == "Qwen3" else None,
        decoder.post_attention_layernorm,
        mlp.gate_proj,
        mlp.up_proj,
        mlp.down_proj,
        mlp.act_fn,
        int(attention.head_dim),
        float(attention.scaling),
        window,
        qkv := None if q_norm is not None else fuse_int4([attention.q_proj, attention.k_proj, attention.v_proj]),
        (attention.q_proj.out_features, attention.k_proj.out_features, attention.v_proj.out_features) if qkv else (0, 0, 0),
        gate_up := fuse_int4([mlp.gate_proj, mlp.up_proj]),
        mlp.gate_proj.out_features if gate_up else 0,
    )


def _hookless(module: Any) -> bool:
    """A module whose hooks a direct ``forward`` call would skip: none, on it or globally."""
    if not isinstance(module, nn.Module):
        return False
    hooks = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks, module._backward_pre_hooks)
    return not any(hooks) and not _global_hooks()


def _global_hooks() -> bool:
    from torch.nn.modules import module as torch_module

    names = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks")
    return any(getattr(torch_module, name, None) for name in names)


def _plain(module: Any, suffix: str, prefix: str) -> bool:
    """``module`` is the family's own ``<prefix><suffix>`` class, without hooks and with its class's forward (not
    one patched on the instance or replaced by a hub kernel)."""
    return (
        isinstance(module, nn.Module)
        and type(module).__name__ == prefix + suffix
        and type(module).__module__.startswith("transformers.models.")
        and "forward" not in vars(module)
        and getattr(type(module).forward, "__module__", "").startswith("transformers.models.")
        and _hookless(module)
    )
