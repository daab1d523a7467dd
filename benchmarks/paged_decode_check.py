"""The device check's ``kernel`` step: the paged decode kernel against the gathered SDPA path, alone.

For the attention shapes of Llama-3.2-1B (32 query heads, 8 KV heads, head size 64) and Llama-3.1-8B (head size
128), in float32 and bfloat16: a random paged cache with shuffled block tables, ``rows`` decode rows of random
context lengths up to ``max_len``, and

* ``max_abs_err``: the kernel's output against SDPA over each row's gathered context (the engine's other path);
* ``kernel_ms`` and ``gather_sdpa_ms``: one layer's decode attention, the kernel against the gather and SDPA
  that the engine ran before it (:func:`amulet_core.engine.paged_attention.paged_attention_forward`'s gathered
  group: index_select of the padded contexts, then SDPA with the padding mask), each the median of ``repeats``
  timed calls after a warm-up;
* ``kv_bytes_per_s``: the kernel's rate over the KV bytes the rows really hold (their lengths, not the padding);
* for requests of two contexts sharing a conversation (``pairs*``): the kernel reading the shared blocks once
  against SDPA (``max_abs_err``), and its time against the kernel reading each row's whole table.

On the CPU dry run Triton's interpreter runs the kernel on tiny sizes (no timing means anything there).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from amulet_core.engine.paged_attention import decode_group
from amulet_core.engine.paged_decode import paged_decode_attention

SHAPES = {"llama_1b": (32, 8, 64), "llama_8b": (32, 8, 128)}
BLOCK = 16


def _timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def compare(
    heads: int, kv_heads: int, dim: int, dtype: torch.dtype, device: torch.device, rows: int, max_len: int, repeats: int
) -> dict[str, float]:
    gen = torch.Generator().manual_seed(heads * dim + rows)
    need = -(-max_len // BLOCK)
    blocks = rows * need + 1
    keys = torch.randn(kv_heads, blocks * BLOCK, dim, generator=gen).to(device, dtype)
    values = torch.randn(kv_heads, blocks * BLOCK, dim, generator=gen).to(device, dtype)
    tables = torch.randperm(blocks, generator=gen)[: rows * need].view(rows, need).to(device)
    lengths = torch.randint(1, max_len + 1, (rows,), generator=gen)
    lengths[0] = max_len
    lengths = lengths.to(device)
    query = torch.randn(rows, heads, dim, generator=gen).to(device, dtype)
    scale = dim**-0.5

    def kernel() -> torch.Tensor:
        return paged_decode_attention(query, keys, values, tables, lengths, BLOCK, max_len, scale)

    def gathered() -> torch.Tensor:  # as paged_attention_forward's gathered decode group does it
        group = decode_group(tables, lengths, BLOCK, max_len)
        assert group.context_slots is not None
        q = query.view(rows, kv_heads, heads // kv_heads, dim)
        k = keys.index_select(1, group.context_slots).view(kv_heads, rows, max_len, dim).transpose(0, 1)
        v = values.index_select(1, group.context_slots).view(kv_heads, rows, max_len, dim).transpose(0, 1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=group.mask, scale=scale).reshape(rows, heads, dim)

    err = float((kernel().float() - gathered().float()).abs().max())
    kernel_ms = _timed(kernel, device, repeats)
    held = int(lengths.sum()) * kv_heads * dim * 2 * keys.element_size()
    return {
        "max_abs_err": err,
        "kernel_ms": kernel_ms,
        "gather_sdpa_ms": _timed(gathered, device, repeats),
        "kv_bytes_per_s": held / (kernel_ms / 1000),
    }


def compare_shared(
    heads: int, kv_heads: int, dim: int, dtype: torch.dtype, device: torch.device, pairs: int, shared: int, tail: int,
    repeats: int,
) -> dict[str, float]:  # fmt: skip
    """``pairs`` requests of two contexts (an ``amulet`` request's preference and contrast) sharing their first
    ``shared`` positions (whole blocks), each context ``tail`` more of its own: the kernel with the shared blocks read
    once (``followers``) against SDPA over the gathered contexts (``max_abs_err``) and against the kernel reading each
    row's whole table (``kernel_ms`` and ``kernel_each_row_ms``)."""
    gen = torch.Generator().manual_seed(heads * dim + pairs)
    rows, length = 2 * pairs, shared + tail
    need, common = -(-length // BLOCK), shared // BLOCK
    blocks = pairs * (common + 2 * (need - common)) + 1
    keys = torch.randn(kv_heads, blocks * BLOCK, dim, generator=gen).to(device, dtype)
    values = torch.randn(kv_heads, blocks * BLOCK, dim, generator=gen).to(device, dtype)
    pool = torch.randperm(blocks, generator=gen).tolist()
    table_rows = []
    for _ in range(pairs):
        head = [pool.pop() for _ in range(common)]
        table_rows += [head + [pool.pop() for _ in range(need - common)] for _ in range(2)]
    tables = torch.tensor(table_rows, device=device)
    lengths = torch.full((rows,), length, device=device)
    followers = torch.full((rows, 3), -1, device=device)
    followers[0::2, 0] = torch.arange(1, rows, 2, device=device)
    skip = torch.zeros(rows, dtype=torch.long, device=device)
    skip[1::2] = shared
    query = torch.randn(rows, heads, dim, generator=gen).to(device, dtype)
    scale = dim**-0.5

    def once() -> torch.Tensor:
        return paged_decode_attention(query, keys, values, tables, lengths, BLOCK, length, scale, None, None, followers, skip)

    def each_row() -> torch.Tensor:
        return paged_decode_attention(query, keys, values, tables, lengths, BLOCK, length, scale)

    group = decode_group(tables, lengths, BLOCK, length)
    assert group.context_slots is not None
    q = query.view(rows, kv_heads, heads // kv_heads, dim)
    k = keys.index_select(1, group.context_slots).view(kv_heads, rows, length, dim).transpose(0, 1)
    v = values.index_select(1, group.context_slots).view(kv_heads, rows, length, dim).transpose(0, 1)
    want = F.scaled_dot_product_attention(q, k, v, scale=scale).reshape(rows, heads, dim)
    return {
        "max_abs_err": float((once().float() - want.float()).abs().max()),
        "kernel_ms": _timed(once, device, repeats),
        "kernel_each_row_ms": _timed(each_row, device, repeats),
    }


def step_kernel(device: torch.device, dry: bool) -> dict[str, Any]:
    """Per shape, dtype and (rows, longest context): :func:`compare`'s figures; then :func:`compare_shared`'s for
    requests of two contexts sharing a conversation (pairs, shared positions, each context's own)."""
    cases = [(2, 40)] if dry else [(1, 1024), (64, 1024), (64, 4096)]
    shared_cases = [(2, 32, 8)] if dry else [(32, 1024, 64), (64, 2048, 32)]
    result: dict[str, Any] = {}
    for name, (heads, kv_heads, dim) in SHAPES.items():
        if dry:
            heads, kv_heads, dim = 4, 2, 16
        for dtype in (torch.float32, torch.bfloat16):
            for rows, max_len in cases:
                key = f"{name}_{str(dtype).removeprefix('torch.')}_rows{rows}_len{max_len}"
                result[key] = compare(heads, kv_heads, dim, dtype, device, rows, max_len, 1 if dry else 20)
                print(key, result[key], flush=True)
            for pairs, shared, tail in shared_cases:
                key = f"{name}_{str(dtype).removeprefix('torch.')}_pairs{pairs}_shared{shared}_tail{tail}"
                figures = compare_shared(heads, kv_heads, dim, dtype, device, pairs, shared, tail, 1 if dry else 20)
                result[key] = figures
                print(key, figures, flush=True)
    return result
