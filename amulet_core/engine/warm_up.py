"""The largest step a configuration can schedule, run once at start-up to measure its activations on a GPU.

The KV budget on a GPU is what is left after the weights and the largest step's activations
(:func:`~amulet_core.engine.kv_budget.kv_budget`): :func:`largest_step` builds that step's batch over a cache of its
own, :func:`allocator_peak` measures what the CUDA allocator held while it ran.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from amulet_core.engine.invariant_attention import step_plan
from amulet_core.engine.memory import blocks_for
from amulet_core.engine.paged_attention import PackedBatch, PagedKVCache, SequenceSpan, causal_mask


def largest_step(
    kv_shape: tuple[int, int, int],
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    deterministic: bool,
    num_tokens: int,
    longest: int,
) -> tuple[PackedBatch, list[int]]:
    """(the batch, the positions) of ``num_tokens`` new tokens: one chunk at the end of a ``longest``-token context
    (the longest attention a prefill chunk does) or, when the context is shorter, full contexts side by side; over a
    cache of its own of ``num_tokens`` slots (``kv_shape``: layers, KV heads, head size; a context's earlier
    positions read those slots again). ``deterministic``: planned for the batch-invariant attention."""
    layers, kv_heads, head_dim = kv_shape
    cache = PagedKVCache(layers, kv_heads, head_dim, blocks_for(num_tokens, block_size), block_size, dtype, device)
    spans: list[SequenceSpan] = []
    positions: list[int] = []
    if longest >= num_tokens:  # one chunk ending a longest context; its earlier positions read the same slots
        earlier = torch.arange(longest - num_tokens, device=device) % num_tokens
        context = torch.cat([earlier, torch.arange(num_tokens, device=device)])
        spans.append(SequenceSpan(0, num_tokens, context, causal_mask(num_tokens, longest, device)))
        positions.extend(range(longest - num_tokens, longest))
    else:  # whole contexts side by side
        for start in range(0, num_tokens, longest):
            n = min(longest, num_tokens - start)
            context = torch.arange(start, start + n, device=device)
            spans.append(SequenceSpan(start, start + n, context, causal_mask(n, n, device)))
            positions.extend(range(n))
    batch = PackedBatch(cache, torch.arange(num_tokens, device=device), tuple(spans))
    if deterministic:
        plan = step_plan([], [], [(s.query_start, s.query_end, s.context_slots) for s in spans], block_size, device)
        batch = PackedBatch(cache, batch.slot_mapping, (), invariant=plan)
    return batch, positions


def allocator_peak(device: torch.device, run: Callable[[], None]) -> tuple[int, int]:
    """(peak, now) bytes the CUDA allocator held across ``run()``, its cached blocks released before and after."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    run()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    stats = torch.cuda.memory_stats(device)
    return int(stats["allocated_bytes.all.peak"]), int(stats["allocated_bytes.all.current"])
