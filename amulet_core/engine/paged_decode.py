"""Decode and prefill attention that read the paged KV cache through the block tables: no gather, no dense copy.

The SDPA path (:func:`amulet_core.engine.paged_attention.paged_attention_forward`) gathers every decode row's
context into a dense ``[rows, kv_heads, max_len, head_dim]`` tensor, padded to the longest row (on a GPU, to the
context bucket of the CUDA graph), and then attends over it: the keys and values are read twice and written
once, and a short row pays for the longest. :func:`paged_decode_attention` instead runs a Triton kernel
(:mod:`amulet_core.engine.paged_decode_triton`, flash-decoding: the keys split into partitions attended in
parallel, then combined) that reads each row's own positions, and only those, from the cache slots its block
table names. Prefill chunks likewise: the SDPA path gathers each chunk's context and calls SDPA once per
chunk; :func:`paged_prefill_attention` attends every chunk of the step in one launch, through the block tables.
They are the GPU path; SDPA stays the CPU path and the reference the kernels are tested against (on CPU tensors
Triton's interpreter runs the same kernels, slowly, where ``TRITON_INTERPRET=1`` was set before Triton was
imported: the tests' use).

:func:`attention_backend` resolves ``--attention-backend``: ``auto`` is the kernel on a CUDA device where
Triton is installed, SDPA elsewhere.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Literal

import torch

AttentionBackend = Literal["auto", "sdpa", "triton", "fixed-order"]
ATTENTION_BACKENDS: tuple[AttentionBackend, ...] = ("auto", "sdpa", "triton", "fixed-order")
"""``fixed-order`` is the batch-invariant attention's compiled kernel (:mod:`amulet_core.engine.fixed_order_kernel`):
``--deterministic`` only, where ``auto`` takes it when it builds and ``sdpa`` keeps its torch operations."""

PARTITION = 256
"""Key positions per partition (one program each, per row and KV head)."""

BLOCK_N = 32
"""Key positions a program reads per iteration."""

_MIN_GROUP = 16
"""``tl.dot`` needs at least 16 rows: a KV head's query heads are padded to this many (masked)."""


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton's interpreter runs the kernels (``TRITON_INTERPRET=1``: the tests on a CPU)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def attention_backend(requested: AttentionBackend, device: torch.device) -> Literal["sdpa", "triton"]:
    """The decode attention a device gets: ``auto`` is the kernel on CUDA with Triton installed, else SDPA;
    ``triton`` where Triton is missing, or on another device (unless Triton's interpreter runs it), is an error."""
    if requested in ("sdpa", "fixed-order"):
        return "sdpa"
    installed = triton_available()
    if requested == "triton":
        if not installed:
            raise ValueError("--attention-backend triton needs Triton, which is not installed.")
        if device.type != "cuda" and not interpreting():
            raise ValueError(f"--attention-backend triton needs a CUDA device; this one is {device.type}.")
        return "triton"
    return "triton" if device.type == "cuda" and installed else "sdpa"


def kernel_probe(device: torch.device, dtype: torch.dtype) -> str | None:
    """Run the decode kernel once on a small random cache (grouped heads, three partitions, shuffled blocks), and the
    prefill kernel on a chunk after cached context, against SDPA over the gathered context: None when they agree,
    else what went wrong, in words. ``auto`` calls this before it
    trusts the kernel on a device (a GPU or a Triton its compiler does not serve falls back to SDPA)."""
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    kv_heads, heads, dim, block, blocks = 2, 4, 64, 16, 112
    lengths = [1, 100, 2 * PARTITION + 9]
    keys = torch.randn(kv_heads, blocks * block, dim, generator=gen).to(device, dtype)
    values = torch.randn(kv_heads, blocks * block, dim, generator=gen).to(device, dtype)
    tables = torch.randperm(blocks, generator=gen)[: 3 * 34].view(3, 34).to(device)
    query = torch.randn(3, heads, dim, generator=gen).to(device, dtype)
    try:
        got = paged_decode_attention(
            query, keys, values, tables, torch.tensor(lengths, device=device), block, max(lengths), dim**-0.5
        )
    except Exception as exc:  # a compiler or a device the kernel does not run on
        return f"{type(exc).__name__}: {exc}"
    worst = 0.0
    for row, length in enumerate(lengths):
        positions = torch.arange(length, device=device)
        slots = tables[row, positions // block] * block + positions % block
        want = F.scaled_dot_product_attention(
            query[row].unsqueeze(1).float(), keys[:, slots].float(), values[:, slots].float(), enable_gqa=True
        )  # [heads, 1, dim]
        worst = max(worst, float((got[row].float() - want[:, 0]).abs().max()))
    # The prefill kernel: a chunk of 40 new tokens after 100 cached ones, in the last row's blocks.
    chunk = torch.randn(40, heads, dim, generator=gen).to(device, dtype)
    positions = torch.arange(140, device=device)
    slots = tables[2, positions // block] * block + positions % block
    try:
        starts, counts, contexts = (torch.tensor([n], device=device) for n in (0, 40, 140))
        got = paged_prefill_attention(chunk, keys, values, tables[2:], starts, counts, contexts, block, 40, dim**-0.5)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    causal = positions.unsqueeze(0) <= positions[100:].unsqueeze(1)  # [40, 140]
    want = F.scaled_dot_product_attention(
        chunk.transpose(0, 1).float(), keys[:, slots].float(), values[:, slots].float(), causal, enable_gqa=True
    )  # [heads, 40, dim]
    worst = max(worst, float((got.float() - want.transpose(0, 1)).abs().max()))
    limit = 1e-4 if dtype == torch.float32 else 5e-2
    return None if worst <= limit else f"differs from SDPA by {worst:.3g} (more than {limit:g})"


def partitions(max_len: int) -> int:
    """Partitions a launch covering contexts of up to ``max_len`` positions has."""
    return max(1, -(-max_len // PARTITION))


def _check_operands(name: str, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """ValueError unless the query (``[n, heads, head_dim]``) fits the cache (``[kv_heads, slots, head_dim]``, its
    head dim contiguous) and a kernel can run on its device; whether Triton's interpreter runs it."""
    heads, head_dim = query.shape[1], query.shape[2]
    if heads % k_cache.shape[0] or k_cache.shape != v_cache.shape or k_cache.shape[-1] != head_dim:
        shapes = f"query {tuple(query.shape)}, cache {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        raise ValueError(f"{name}: {shapes} do not fit")
    if k_cache.stride(-1) != 1 or v_cache.stride() != k_cache.stride():
        raise ValueError(f"{name}: the cache's head dim must be contiguous")
    interpreted = query.device.type != "cuda"
    if interpreted and not interpreting():
        raise ValueError(f"{name} runs on CUDA tensors (on others under TRITON_INTERPRET=1 only)")
    return interpreted


def paged_decode_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tables: torch.Tensor,
    lengths: torch.Tensor,
    block_size: int,
    max_len: int,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
    followers: torch.Tensor | None = None,
    skip: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one new token per row over its cached context.

    ``query``: ``[rows, heads, head_dim]``, the new token at position ``lengths[row] - 1`` (its key and value
    already in the cache); ``k_cache``, ``v_cache``: ``[kv_heads, slots, head_dim]``; ``tables``: ``[rows,
    blocks]`` block ids (``blocks * block_size >= max_len``; entries past a row's length are never read);
    ``lengths``: ``[rows]``, each at most ``max_len``. ``window``: keys more than ``window - 1`` positions before
    the query are not attended (Mistral's, Gemma 2's sliding window); ``softcap``: scores capped to ``softcap *
    tanh(score / softcap)`` (Gemma 2). Returns ``[rows, heads, head_dim]`` in the query's dtype; float32 products
    are exact float32 (no TF32); bfloat16 and float16 ones run on the tensor cores, accumulating in float32. The
    launch depends only on the shapes and ``max_len``, never on ``lengths``' or the followers' values, so it can be
    captured in a CUDA graph.

    Shared prefixes (a request's preference and contrast contexts share the conversation's blocks, as requests do a
    cached system prompt): ``followers`` (``[rows, F]``, F + 1 a power of two; -1 for none) names for each row the
    rows whose first ``skip[follower]`` positions lie in the same blocks of its table (``skip``: ``[rows]``, 0 for a
    row that leads or shares nothing). A leader's programs then attend those positions for its followers' queries
    too, as more rows of the same products (free up to the tensor cores' 16 rows), so their keys and values are
    read once, not once per context; the followers' own programs start after them; every row's partial results are
    then combined by their log-sum-exp (as FlashInfer's cascade attention does). Not with a ``window``.
    """
    from amulet_core.engine import paged_decode_triton as kernels

    interpreted = _check_operands("paged_decode_attention", query, k_cache, v_cache)
    rows, heads, head_dim = query.shape
    kv_heads = k_cache.shape[0]
    if tables.shape[0] != rows or lengths.shape != (rows,) or tables.shape[1] * block_size < max_len:
        raise ValueError("paged_decode_attention: tables, lengths and max_len do not describe the rows")
    # Followers and skip, or (with none, or a window) the lengths standing for the pointers the kernel then ignores.
    followers_in, skip_in = (followers, skip) if followers is not None and skip is not None else (lengths, lengths)
    cascade = followers_in is followers and window is None
    if cascade and (followers_in.shape[0] != rows or skip_in.shape != (rows,)):
        raise ValueError("paged_decode_attention: followers and skip do not describe the rows")
    members = 1 + followers_in.shape[1] if cascade else 1
    if members & (members - 1):
        raise ValueError(f"paged_decode_attention: {members - 1} followers a row (one less than a power of two)")
    group = kernels.next_power_of_2(heads // kv_heads)
    parts = partitions(max_len)
    slots = 2 * parts if cascade else parts  # the followers' partitions attended by their leaders: slots parts..
    query = query.contiguous()
    out = torch.empty_like(query)
    # One partition: its normalised output is the answer, stored in the query's dtype with no combining launch.
    part_out = out.unsqueeze(2) if slots == 1 else query.new_empty(rows, heads, slots, head_dim, dtype=torch.float32)
    part_lse = query.new_empty(rows, heads, slots, dtype=torch.float32)  # (a row without a leader: its own slots)
    partition, combine = kernels.partition_kernel, kernels.combine_kernel
    block_d = kernels.next_power_of_2(head_dim)
    partition[(rows, kv_heads, parts)](
        query, k_cache, v_cache, tables, lengths, followers_in, skip_in, part_out, part_lse,
        query.stride(0), query.stride(1), k_cache.stride(0), k_cache.stride(1), tables.stride(0),
        followers_in.stride(0), part_out.stride(0), part_out.stride(1), part_out.stride(2), part_lse.stride(0),
        part_lse.stride(1), parts, scale, softcap or 1.0, window or 0, block_size, head_dim, heads // kv_heads,
        GROUP=group, MEMBERS=members, ROWS=max(_MIN_GROUP, group * members), BLOCK_D=block_d, BLOCK_N=BLOCK_N,
        PARTITION=PARTITION, USE_SOFTCAP=softcap is not None, USE_WINDOW=window is not None,
        EXACT=query.dtype == torch.float32 or interpreted,
    )  # fmt: skip
    if slots == 1:
        return out
    combine[(rows, heads)](
        part_out, part_lse, out, skip_in,
        part_out.stride(0), part_out.stride(1), part_out.stride(2), part_lse.stride(0), part_lse.stride(1),
        out.stride(0), out.stride(1), parts, head_dim,
        BLOCK_P=kernels.next_power_of_2(slots), BLOCK_D=block_d, CASCADE=cascade,
    )  # fmt: skip
    return out


PREFILL_ROWS = 64
"""Rows of a prefill program's ``tl.dot``: ``BLOCK_Q`` new tokens times a KV head's (padded) query heads."""


def paged_prefill_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tables: torch.Tensor,
    starts: torch.Tensor,
    counts: torch.Tensor,
    contexts: torch.Tensor,
    block_size: int,
    max_count: int,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Causal attention of prefill chunks (spans) over their cached and new keys, all spans in one launch.

    ``query``: ``[tokens, heads, head_dim]``, the spans' new tokens packed; span ``i`` is tokens ``starts[i] ..
    starts[i] + counts[i] - 1``, at positions ``contexts[i] - counts[i] ..`` ``contexts[i] - 1`` (their keys and
    values already in the cache), with block table ``tables[i]``; ``max_count`` is at least every ``counts[i]``.
    ``window``, ``softcap`` and the dtypes as :func:`paged_decode_attention`. Tokens of ``query`` in no span are
    left unwritten in the result (``[tokens, heads, head_dim]``, the query's dtype).
    """
    from amulet_core.engine import paged_decode_triton as kernels

    interpreted = _check_operands("paged_prefill_attention", query, k_cache, v_cache)
    tokens, heads, head_dim = query.shape
    kv_heads = k_cache.shape[0]
    spans = tables.shape[0]
    if not starts.shape == counts.shape == contexts.shape == (spans,) or max_count < 1:
        raise ValueError("paged_prefill_attention: tables, starts, counts and contexts do not describe the spans")
    query = query.contiguous()
    out = torch.empty_like(query)
    group = heads // kv_heads
    padded_group = kernels.next_power_of_2(group)
    block_q = max(1, PREFILL_ROWS // padded_group)
    kernels.prefill_kernel[(spans, kv_heads, -(-max_count // block_q))](
        query, k_cache, v_cache, tables, starts, counts, contexts, out,
        query.stride(0), query.stride(1), k_cache.stride(0), k_cache.stride(1), tables.stride(0),
        out.stride(0), out.stride(1),
        scale, softcap or 1.0, window or 0, block_size, head_dim, group,
        GROUP=padded_group, BLOCK_Q=block_q, BLOCK_D=kernels.next_power_of_2(head_dim), BLOCK_N=BLOCK_N,
        USE_SOFTCAP=softcap is not None, USE_WINDOW=window is not None, EXACT=query.dtype == torch.float32 or interpreted,
    )  # fmt: skip
    return out
