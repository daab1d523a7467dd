"""Paged KV cache and the attention function that transformers' models call with it.

The engine packs every scheduled token of every sequence into one row (batch size 1,
like varlen flash-attention) and passes a :class:`PackedBatch` through the model's
``**kwargs``; transformers hands it to the registered attention function, which writes the
new keys and values into the paged pool and attends, sequence by sequence, over that
sequence's cached context (with SDPA, or batch-invariantly when the batch carries an
:class:`~amulet_core.engine.invariant_attention.InvariantPlan`; a decode group marked for it, through the block
tables with :func:`~amulet_core.engine.paged_decode.paged_decode_attention`, and prefill chunks marked for it with
:func:`~amulet_core.engine.paged_decode.paged_prefill_attention`). Model files stay transformers' own.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from amulet_core.engine.invariant_attention import InvariantPlan, invariant_attention
from amulet_core.engine.paged_decode import paged_decode_attention, paged_prefill_attention

ATTENTION_NAME = "amulet_paged"


class PagedKVCache:
    """Per layer, keys and values for ``num_blocks * block_size`` token slots: ``[kv_heads, slots, head_dim]``."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        slots = num_blocks * block_size
        self.block_size = block_size
        self.keys = [torch.zeros(num_kv_heads, slots, head_dim, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(num_kv_heads, slots, head_dim, dtype=dtype, device=device) for _ in range(num_layers)]

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class SequenceSpan:
    """One sequence's part of a packed step."""

    query_start: int
    query_end: int
    context_slots: torch.Tensor
    """Cache slots of positions 0..context_len-1 (the new tokens are the last ones)."""
    mask: torch.Tensor | None
    """Boolean [q, k] mask (True = attend) when the new tokens need causal masking, else None."""


@dataclass(frozen=True)
class DecodeGroup:
    """The first ``size`` packed tokens: one new token each of ``size`` sequences, attended in one call.

    Either gathered for SDPA (``context_slots``, with ``mask``) or read in place by the paged decode kernel
    (``tables`` and ``lengths``; :mod:`amulet_core.engine.paged_decode`)."""

    size: int
    context_slots: torch.Tensor | None
    """``[size * max_len]`` cache slots, each sequence's context padded to ``max_len`` (None: the kernel's group)."""
    max_len: int
    mask: torch.Tensor | None
    """``[size, 1, 1, max_len]`` True where a padded position is real; None when none is padding."""
    tables: torch.Tensor | None = None
    """The kernel's group: ``[size, blocks]`` block ids of each sequence's context."""
    lengths: torch.Tensor | None = None
    """``[size]`` context lengths (the new token is the last position); for the gathered group None when every row's
    is ``max_len``."""
    followers: torch.Tensor | None = None
    """The kernel's group: ``[size, F]`` the rows whose leading blocks each row's table holds (-1: none), with
    ``skip`` (``[size]``) how many leading positions of each row its leader attends
    (:func:`~amulet_core.engine.paged_decode.paged_decode_attention`); None: each row reads its whole table."""
    skip: torch.Tensor | None = None


@dataclass(frozen=True)
class PrefillGroup:
    """The prefill chunks of a step for the paged prefill kernel (:func:`~amulet_core.engine.paged_decode.
    paged_prefill_attention`): the packed tokens from ``first`` on, span by span."""

    first: int
    tables: torch.Tensor
    """``[spans, blocks]`` each span's block table."""
    starts: torch.Tensor
    """``[spans]`` each span's first token, counted from ``first``."""
    counts: torch.Tensor
    """``[spans]`` its new tokens."""
    contexts: torch.Tensor
    """``[spans]`` its context length once they are written (the last new token's position + 1)."""
    max_count: int


@dataclass(frozen=True)
class PackedBatch:
    cache: PagedKVCache
    slot_mapping: torch.Tensor
    """Cache slot of every packed new token."""
    spans: tuple[SequenceSpan, ...]
    """Sequences with several new tokens (prefill chunks), packed after the decode group."""
    decode: DecodeGroup | None = None
    invariant: InvariantPlan | None = None
    """When set, attention is batch-invariant over this plan (``spans`` and ``decode`` are not read)."""
    prefill: PrefillGroup | None = None
    """Prefill chunks for the paged prefill kernel, packed after the decode group (then ``spans`` is empty)."""


def padded_block_tables(tables: Iterable[list[int]], blocks: int, pad_block: int) -> list[int]:
    """The first ``blocks`` entries of each block table, padded with ``pad_block``, flat (row after row)."""
    flat: list[int] = []
    for table in tables:
        row = table[:blocks]
        flat.extend(row)
        flat.extend([pad_block] * (blocks - len(row)))
    return flat


def decode_group(
    tables: torch.Tensor,
    lengths: torch.Tensor | None,
    block_size: int,
    length: int,
    paged_kernel: bool = False,
    shared: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> DecodeGroup:
    """The group of decode rows whose contexts are ``tables`` (``[rows, blocks]`` block ids, ``blocks *
    block_size >= length``): slots computed on the device, and with ``lengths`` (each row's context
    length) the mask of its padding; None means no row is padded. With ``paged_kernel`` the kernel reads the
    tables itself (``lengths`` is then required), and ``shared`` (followers and skip: :func:`shared_prefixes`) the
    blocks rows share once."""
    rows = tables.shape[0]
    if paged_kernel:
        if lengths is None:
            raise ValueError("decode_group: the paged kernel needs every row's length")
        followers, skip = shared if shared is not None else (None, None)
        return DecodeGroup(rows, None, length, None, tables, lengths, followers, skip)
    offsets = torch.arange(block_size, dtype=torch.long, device=tables.device)
    slots = (tables.unsqueeze(-1) * block_size + offsets).view(rows, -1)[:, :length]
    mask = None
    if lengths is not None:
        positions = torch.arange(length, device=tables.device).unsqueeze(0)
        mask = (positions < lengths.unsqueeze(1)).view(rows, 1, 1, length)
    return DecodeGroup(rows, slots.reshape(-1), length, mask, None, lengths)


def windowed_mask(group: DecodeGroup, window: int, device: torch.device) -> torch.Tensor:
    """The gathered group's ``[size, 1, 1, max_len]`` mask for a layer with a sliding ``window``: True where a
    position is real and within ``window`` of its row's new token (the prefill's :func:`causal_mask` rule)."""
    lengths = group.lengths if group.lengths is not None else torch.full((group.size,), group.max_len, device=device)
    last = lengths.unsqueeze(1)
    positions = torch.arange(group.max_len, device=device).unsqueeze(0)
    return ((positions < last) & (positions >= last - window)).view(group.size, 1, 1, group.max_len)


def causal_mask(num_new: int, context_len: int, device: torch.device, window: int | None = None) -> torch.Tensor | None:
    """Mask for ``num_new`` queries at the end of a ``context_len`` context, or None if none is needed."""
    if num_new == 1 and (window is None or context_len <= window):
        return None
    q_pos = torch.arange(context_len - num_new, context_len, device=device).unsqueeze(1)
    k_pos = torch.arange(context_len, device=device).unsqueeze(0)
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float | None,
    softcap: float | None,
    gqa: bool = False,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention``; with a ``softcap`` (which SDPA lacks), the same computed step by step
    with every scaled score ``s`` capped to ``softcap * tanh(s / softcap)``, as transformers' eager Gemma 2."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    if gqa:  # [.., heads, n, d] against [.., kv_heads, m, d]
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
    scores = torch.matmul(q, k.transpose(-2, -1)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return torch.matmul(torch.softmax(scores.float(), dim=-1).to(q.dtype), v)


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    amulet_batch: PackedBatch | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention over the paged cache. query: [1, heads, N, d]; key, value: [1, kv_heads, N, d]."""
    if amulet_batch is None:
        # A plain call of the same model (no engine batch, no padding): ordinary causal SDPA.
        softcap = kwargs.get("softcap")
        if not softcap:
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        mask = attention_mask[:, :, :, : key.shape[-2]] if attention_mask is not None else None
        if mask is None:
            mask = causal_mask(query.shape[-2], key.shape[-2], query.device, kwargs.get("sliding_window"))
        out = attention(query, key, value, mask, scaling, float(softcap), gqa=query.shape[1] != key.shape[1])
        return out.transpose(1, 2).contiguous(), None
    layer = cast(int, module.layer_idx)
    k_cache = amulet_batch.cache.keys[layer]
    v_cache = amulet_batch.cache.values[layer]
    # A cache of another dtype than the model's (EngineConfig.kv_cache_dtype) holds the keys and values rounded once
    # (converted only then: a same-dtype .to() still costs a call, twice a layer).
    new_keys, new_values = key[0], value[0]
    if new_keys.dtype != k_cache.dtype:
        new_keys, new_values = new_keys.to(k_cache.dtype), new_values.to(v_cache.dtype)
    k_cache.index_copy_(1, amulet_batch.slot_mapping, new_keys)
    v_cache.index_copy_(1, amulet_batch.slot_mapping, new_values)
    window = kwargs.get("sliding_window")
    softcap = kwargs.get("softcap")
    softcap = float(softcap) if softcap else None  # Gemma 2's attn_logit_softcapping
    if amulet_batch.invariant is not None:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        plan, limit = amulet_batch.invariant, window if isinstance(window, int) else None
        return invariant_attention(query, k_cache, v_cache, plan, scale, limit, softcap), None
    attend = functools.partial(attention, scale=scaling, softcap=softcap)
    gqa = query.shape[1] != key.shape[1]
    outputs = []
    decode = amulet_batch.decode
    if decode is not None and decode.tables is not None and decode.lengths is not None:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        out = paged_decode_attention(
            query[0, :, : decode.size].transpose(0, 1), k_cache, v_cache, decode.tables, decode.lengths,
            amulet_batch.cache.block_size, decode.max_len, scale, window if isinstance(window, int) else None, softcap,
            decode.followers, decode.skip,
        )  # fmt: skip
        outputs.append(out.transpose(0, 1).unsqueeze(0))
    elif decode is not None and decode.context_slots is not None:
        # Each KV head's group of query heads attends as that many queries of one head (GQA as MQA), so
        # the keys and values are read once per KV head and never repeated for the query heads.
        heads, kv_heads, dim, size = query.shape[1], key.shape[1], query.shape[-1], decode.size
        q = query[0, :, :size].transpose(0, 1).reshape(size, kv_heads, heads // kv_heads, dim)  # [B, kv, group, d]
        k = _gathered(k_cache, decode.context_slots, query.dtype).view(kv_heads, size, decode.max_len, dim).transpose(0, 1)
        v = _gathered(v_cache, decode.context_slots, query.dtype).view(kv_heads, size, decode.max_len, dim).transpose(0, 1)
        mask = decode.mask
        if isinstance(window, int) and decode.max_len > window:
            mask = windowed_mask(decode, window, query.device)
        out = attend(q, k, v, mask)  # [B, kv, group, d]
        outputs.append(out.reshape(size, heads, dim).transpose(0, 1).unsqueeze(0))
    prefill = amulet_batch.prefill
    if prefill is not None:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        out = paged_prefill_attention(
            query[0, :, prefill.first :].transpose(0, 1), k_cache, v_cache, prefill.tables, prefill.starts,
            prefill.counts, prefill.contexts, amulet_batch.cache.block_size, prefill.max_count, scale,
            window if isinstance(window, int) else None, softcap,
        )  # fmt: skip
        outputs.append(out.transpose(0, 1).unsqueeze(0))
    for span in amulet_batch.spans:
        q = query[:, :, span.query_start : span.query_end]
        k = _gathered(k_cache, span.context_slots, query.dtype).unsqueeze(0)
        v = _gathered(v_cache, span.context_slots, query.dtype).unsqueeze(0)
        mask = span.mask
        context_len = span.context_slots.shape[0]
        if isinstance(window, int) and context_len > window:
            mask = causal_mask(span.query_end - span.query_start, context_len, query.device, window)
        outputs.append(attend(q, k, v, mask, gqa=gqa))
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
    return out.transpose(1, 2), None


def _gathered(cache: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The cache's rows at ``slots`` (``[kv_heads, len(slots), head_dim]``) in ``dtype`` (the queries')."""
    rows = cache.index_select(1, slots)
    return rows if rows.dtype == dtype else rows.to(dtype)


def register_paged_attention() -> str:
    """Make the attention function known to transformers (idempotent); returns its name."""
    AttentionInterface.register(ATTENTION_NAME, paged_attention_forward)
    return ATTENTION_NAME
