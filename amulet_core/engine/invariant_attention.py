"""Batch-invariant attention over the paged KV cache: a query's output does not depend on the step it is in.

SDPA's CPU kernels split the queries and the keys into blocks whose sizes depend on how many of each a call
has, and BLAS picks its kernel (and its order of additions) by the shape of the whole problem; so the same
query attending to the same keys gave different bits when it was prefilled cold, prefilled after a prefix-cache
hit, or decoded beside other sequences. Here every query's arithmetic is fixed:

* the keys of a context are cut into blocks of :data:`KEY_BLOCK` positions counted from position 0, so a key
  always sits in the same block at the same column, whether it came from the cache or from this step;
* each matrix product is one problem of a fixed shape, one token's query heads of one KV head (``group x
  head_dim``) against one key block, batched with ``torch.bmm``: a problem's bits did not depend on how many
  others the batch held, nor where, for MKL (float32) and oneDNN (bfloat16) at 1 to 16 threads, as long as
  every problem starts on an aligned address (head dims are padded to 16 elements: MKL picked another kernel,
  with other bits, for a misaligned float32 problem);
* the softmax is computed block by block in float32: the row's maximum (exact), ``exp`` (the same bits in every
  lane), each block's sum, the blocks' sums added in block order into a float64 accumulator and rounded once;
  masked keys (past the query, outside its window, padding) weigh exact zeros and add exact zeros;
* the weighted values of the blocks are added the same way, in block order, in float64, rounded once.

The products run in bfloat16 for a bfloat16 model's cache (accumulating in float32 but rounding the scores, as
transformers' eager attention does), else in float32 (a float32 model's float16 or bfloat16 cache read as the float32
values it holds). Tokens of a prefill chunk skip the key blocks wholly after them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

from amulet_core.engine.fixed_order_kernel import FixedOrderAttention, KernelRows

KEY_BLOCK = 128
"""Key positions per block: the unit of the fixed order of additions (and of a decode row's padding)."""

TOKEN_BATCH = 64
"""Tokens of a prefill chunk per batched product against one key block (the block is repeated that many times:
oneDNN copies an operand broadcast over the batch, whatever its size)."""

_ALIGN = 16
"""Head dims are padded to a multiple of this many elements (64 bytes of float32), so that every problem of a batch
starts on an aligned address."""


def key_blocks(length: int) -> int:
    """Key blocks that hold a context of ``length`` positions."""
    return -(-length // KEY_BLOCK)


def key_bias(last: torch.Tensor, blocks: int, window: int | None = None) -> torch.Tensor:
    """Additive mask ``[rows, blocks, 1, KEY_BLOCK]`` of queries at positions ``last`` (``[rows]``): 0 for the keys
    a query sees (itself and before, within ``window``), -inf elsewhere (a finite score plus 0 is itself)."""
    key = torch.arange(blocks * KEY_BLOCK, device=last.device).unsqueeze(0)
    hidden = key > last.unsqueeze(1)
    if window is not None:
        hidden |= key <= last.unsqueeze(1) - window
    bias = torch.zeros(hidden.shape, device=last.device).masked_fill_(hidden, float("-inf"))
    return bias.view(-1, blocks, 1, KEY_BLOCK)


@dataclass(frozen=True)
class InvariantDecode:
    """The first ``size`` packed tokens: one new token each of ``size`` sequences."""

    size: int
    blocks: int
    slots: torch.Tensor
    """``[size * blocks * KEY_BLOCK]`` cache slots of key positions 0, 1, ... of each row (padding: any slot)."""
    lengths: torch.Tensor
    """``[size]`` context lengths: the new token is at position ``length - 1``; later keys are masked."""
    window: int | None = None
    """The sliding window :attr:`bias` masks with (rows that stand for a prefill chunk's tokens carry the layer's)."""

    @cached_property
    def bias(self) -> torch.Tensor:
        """:func:`key_bias` of the rows (the torch path's mask, built on first use: the kernel does not read it)."""
        return key_bias(self.lengths - 1, self.blocks, self.window)


@dataclass(frozen=True)
class InvariantSpan:
    """A prefill chunk: packed tokens ``query_start..query_end-1`` at positions ``first_position...``."""

    query_start: int
    query_end: int
    first_position: int
    slots: torch.Tensor
    """``[blocks * KEY_BLOCK]`` cache slots of key positions 0, 1, ... (padding: any slot)."""

    @classmethod
    def of(cls, query_start: int, query_end: int, context: torch.Tensor) -> InvariantSpan:
        """The chunk of packed tokens ``query_start..query_end-1`` ending the context of slots ``context``."""
        length, blocks = context.shape[0], key_blocks(context.shape[0])
        first = length - (query_end - query_start)
        return cls(query_start, query_end, first, F.pad(context, (0, blocks * KEY_BLOCK - length)))

    @property
    def size(self) -> int:
        return self.query_end - self.query_start

    @property
    def lengths(self) -> torch.Tensor:
        """Each token's context length."""
        return torch.arange(self.first_position + 1, self.first_position + self.size + 1, device=self.slots.device)

    @cached_property
    def bias(self) -> torch.Tensor:
        """:func:`key_bias` of the chunk's tokens, without a window (the torch path's mask, built on first use: the
        kernel does not read it)."""
        return key_bias(self.lengths - 1, self.slots.shape[0] // KEY_BLOCK)


@dataclass(frozen=True)
class InvariantPlan:
    """Where every packed token's keys are: decode rows first, then prefill chunks (the packing order); with a
    ``kernel``, every token attends through it (:mod:`~amulet_core.engine.fixed_order_kernel`), else through
    torch operations of fixed shapes."""

    decode: InvariantDecode | None
    spans: tuple[InvariantSpan, ...]
    kernel: FixedOrderAttention | None = None

    @cached_property
    def kernel_rows(self) -> KernelRows:
        """Each packed token's context for the kernel, built once a step (every layer reads it)."""
        slots, offsets, lengths, start = [], [], [], 0
        if self.decode is not None:
            width = self.decode.blocks * KEY_BLOCK
            slots.append(self.decode.slots)
            offsets.append(torch.arange(0, self.decode.size * width, width))
            lengths.append(self.decode.lengths)
            start = self.decode.size * width
        for span in self.spans:
            slots.append(span.slots)
            offsets.append(torch.full((span.size,), start, dtype=torch.long))
            lengths.append(span.lengths)
            start += span.slots.shape[0]
        return KernelRows(*(torch.cat(parts).to("cpu", torch.long).contiguous() for parts in (slots, offsets, lengths)))


def decode_plan(tables: torch.Tensor, lengths: torch.Tensor, block_size: int, longest: int) -> InvariantDecode:
    """The decode rows whose contexts are ``tables`` (``[rows, n]`` block ids, ``n * block_size >= longest``)
    and ``lengths`` (each at most ``longest``), slots computed on the device; a row's positions past its table
    read its last block (masked)."""
    rows, blocks = tables.shape[0], key_blocks(longest)
    positions = torch.arange(blocks * KEY_BLOCK, device=tables.device)
    columns = (positions // block_size).clamp(max=tables.shape[1] - 1)
    slots = tables[:, columns] * block_size + positions % block_size
    return InvariantDecode(rows, blocks, slots.reshape(-1), lengths)


def step_plan(
    tables: list[list[int]],
    lengths: list[int],
    spans: list[tuple[int, int, torch.Tensor]],
    block_size: int,
    device: torch.device,
    kernel: FixedOrderAttention | None = None,
) -> InvariantPlan:
    """A step's plan: its decode rows (each row's block table and context length) and its prefill chunks (each
    chunk's packed range and the slots of its whole context), attended through ``kernel`` when given."""
    decode = None
    if tables:
        longest = max(lengths)
        width = -(-longest // block_size)
        flat = [block for table in tables for block in table[:width] + [0] * (width - len(table[:width]))]
        rows = torch.tensor(flat, dtype=torch.long, device=device).view(len(tables), width)
        decode = decode_plan(rows, torch.tensor(lengths, dtype=torch.long, device=device), block_size, longest)
    return InvariantPlan(decode, tuple(InvariantSpan.of(start, end, context) for start, end, context in spans), kernel)


def invariant_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    plan: InvariantPlan,
    scaling: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention of the packed ``query`` ``[1, heads, N, head_dim]`` over the cache (``[kv_heads, slots,
    head_dim]``, this step's keys already written); ``[1, N, heads, head_dim]`` in the query's dtype. ``softcap``
    (Gemma 2's ``attn_logit_softcapping``): every scaled score ``s`` becomes ``softcap * tanh(s / softcap)``."""
    if plan.kernel is not None:
        return plan.kernel(query, k_cache, v_cache, plan.kernel_rows, scaling, window, softcap)
    heads, tokens, dim = query.shape[1], query.shape[2], query.shape[3]
    kv_heads = k_cache.shape[0]
    group = heads // kv_heads
    q = query[0]
    if q.dtype != matmul_dtype(k_cache.dtype, query.dtype):
        q = q.to(matmul_dtype(k_cache.dtype, query.dtype))
    q = q.view(kv_heads, group, tokens, dim).transpose(1, 2)
    q = _pad_dim(torch.mul(q, scaling, out=q.new_empty(q.shape)))  # [kv, N, group, d]: a token's heads, a problem
    parts = []
    if plan.decode is not None:
        parts.append(_decode(q[:, : plan.decode.size], k_cache, v_cache, plan.decode, window, softcap))
    for span in plan.spans:
        parts.append(_span(q[:, span.query_start : span.query_end], k_cache, v_cache, span, window, softcap))
    if len(parts) == 1 and parts[0].shape[-1] == dim and parts[0].dtype == query.dtype:  # nothing to round
        return parts[0].permute(1, 0, 2, 3).reshape(1, tokens, heads, dim)
    out = torch.empty(tokens, kv_heads, group, dim, dtype=query.dtype, device=query.device)
    start = 0
    for part in parts:  # [kv, n, group, padded dim] in float32: rounded to the query's dtype as they are copied
        out[start : start + part.shape[1]].copy_(part[..., :dim].permute(1, 0, 2, 3))
        start += part.shape[1]
    return out.view(1, tokens, heads, dim)


def matmul_dtype(cache_dtype: torch.dtype, query_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the products: bfloat16 for a bfloat16 model's bfloat16 cache, else float32 (a float32 model's
    16-bit cache is read as the float32 values it holds)."""
    return torch.bfloat16 if cache_dtype == torch.bfloat16 and query_dtype == torch.bfloat16 else torch.float32


def _pad_dim(t: torch.Tensor) -> torch.Tensor:
    extra = -t.shape[-1] % _ALIGN
    return F.pad(t, (0, extra)) if extra else t


def _gather(cache: torch.Tensor, slots: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Keys or values of ``slots`` as ``[kv_heads, *shape, KEY_BLOCK, padded dim]`` in ``dtype``."""
    rows = cache.index_select(1, slots).view(cache.shape[0], *shape, KEY_BLOCK, cache.shape[-1])
    return _pad_dim(rows if rows.dtype == dtype else rows.to(dtype))


def capped(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """``softcap * tanh(scores / softcap)`` in place (elementwise: a score's bits do not depend on the others)."""
    if softcap is None:
        return scores
    return scores.div_(softcap).tanh_().mul_(softcap)


def _decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    rows: InvariantDecode,
    window: int | None,
    softcap: float | None = None,
):
    """``q`` ``[kv, D, group, d]``, each row its own context: one batch of problems per product, one problem per
    (KV head, row, key block)."""
    kv, size, group, dim = q.shape
    blocks = rows.blocks
    keys = _gather(k_cache, rows.slots, (size, blocks), q.dtype).view(-1, KEY_BLOCK, dim)
    values = _gather(v_cache, rows.slots, (size, blocks), q.dtype).view(-1, KEY_BLOCK, dim)
    queries = q.unsqueeze(2).expand(kv, size, blocks, group, dim).reshape(-1, group, dim)
    scores = capped(torch.bmm(queries, keys.transpose(1, 2)).view(kv, size, blocks, group, KEY_BLOCK), softcap)
    bias = rows.bias if window is None else key_bias(rows.lengths - 1, blocks, window)
    weights = torch.add(scores, bias, out=torch.empty(scores.shape, device=q.device))  # float32, masked
    weights.sub_(weights.amax(dim=(2, 4), keepdim=True)).exp_()
    total = weights.sum(-1, keepdim=True)  # [kv, D, blocks, group, 1]: each block's sum, then block after block
    if blocks > 1:
        total = total.cumsum(2).narrow(2, blocks - 1, 1)
    probabilities = torch.div(weights, total, out=weights).to(q.dtype)
    weighted = torch.bmm(probabilities.view(-1, group, KEY_BLOCK), values).view(kv, size, blocks, group, dim)
    if blocks == 1:  # (a sum of one block is the block: the caller rounds it to the query's dtype, as it would)
        return weighted.select(2, 0)
    return weighted.cumsum(2, dtype=torch.float32).select(2, -1)  # the blocks in order, rounded once


def _span(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    span: InvariantSpan,
    window: int | None,
    softcap: float | None = None,
):
    """``q`` ``[kv, n, group, d]`` of consecutive positions, all attending to one context. With fewer tokens than
    the context has blocks (a short tail after a long cached prefix), each token is computed as a decode row
    of that context; else :func:`_span_by_block`."""
    n, blocks = span.size, span.slots.shape[0] // KEY_BLOCK
    if blocks > n:
        rows = InvariantDecode(n, blocks, span.slots.repeat(n), span.lengths, window)
        return _decode(q, k_cache, v_cache, rows, None, softcap)  # the window is in the rows' bias
    return _span_by_block(q, k_cache, v_cache, span, window, softcap)


def _span_by_block(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    span: InvariantSpan,
    window: int | None,
    softcap: float | None = None,
):
    """Per KV head and key block, the problems of the tokens that see the block, batched by up to
    :data:`TOKEN_BATCH` (the block repeated in each problem); then :func:`_decode`'s arithmetic, block by block
    over the tokens that see each block (a token adds nothing for a block it does not see, where a decode row
    adds exact zeros)."""
    kv, n, group, dim = q.shape
    blocks, p0 = span.slots.shape[0] // KEY_BLOCK, span.first_position
    keys = _gather(k_cache, span.slots, (blocks,), q.dtype)
    values = _gather(v_cache, span.slots, (blocks,), q.dtype)
    bias = span.bias if window is None else key_bias(span.lengths - 1, blocks, window)
    first = [max(0, b * KEY_BLOCK - p0) for b in range(blocks)]  # the chunk's first token that sees block b
    weights = torch.empty(kv, blocks, n, group, KEY_BLOCK, device=q.device)
    highest = torch.full((kv, n, group, 1), float("-inf"), device=q.device)
    for b in range(blocks):
        scores = capped(_products(q, keys[:, b], first[b], transpose=True), softcap)
        block = torch.add(scores, bias[first[b] :, b], out=weights[:, b, first[b] :])
        torch.maximum(highest[:, first[b] :], block.amax(-1, keepdim=True), out=highest[:, first[b] :])
    total = torch.zeros(kv, n, group, dtype=torch.float64, device=q.device)
    for b in range(blocks):  # block after block: each token adds its blocks' sums in order
        block = weights[:, b, first[b] :].sub_(highest[:, first[b] :]).exp_()
        total[:, first[b] :] += block.sum(-1)
    rounded = total.float().unsqueeze(-1)
    weighted = torch.zeros(kv, n, group, dim, dtype=torch.float64, device=q.device)
    for b in range(blocks):
        probabilities = (weights[:, b, first[b] :] / rounded[:, first[b] :]).to(q.dtype)
        weighted[:, first[b] :] += _products(probabilities, values[:, b], 0, transpose=False)
    return weighted.float()


def _products(rows: torch.Tensor, block: torch.Tensor, start: int, transpose: bool) -> torch.Tensor:
    """``rows[:, start:]`` (``[kv, n, group, x]``) times each KV head's ``block[h]`` (``[KEY_BLOCK, d]``, transposed
    when ``transpose``), one problem per (KV head, token), in batches of up to :data:`TOKEN_BATCH` tokens:
    ``[kv, n - start, group, y]`` in ``rows``' dtype."""
    kv, n, group = rows.shape[0], rows.shape[1], rows.shape[2]
    width = block.shape[1] if transpose else block.shape[2]
    out = rows.new_empty(kv, n - start, group, width)
    count = min(TOKEN_BATCH, n - start)
    repeated = block.unsqueeze(1).expand(kv, count, *block.shape[1:]).contiguous()  # a decode row's block layout
    for lo in range(start, n, TOKEN_BATCH):
        hi = min(n, lo + TOKEN_BATCH)
        lhs = rows[:, lo:hi].reshape(kv * (hi - lo), group, -1)
        rhs = repeated[:, : hi - lo].reshape(kv * (hi - lo), *block.shape[1:])
        product = torch.bmm(lhs, rhs.transpose(1, 2) if transpose else rhs)
        out[:, lo - start : hi - start] = product.view(kv, hi - lo, group, width)
    return out
