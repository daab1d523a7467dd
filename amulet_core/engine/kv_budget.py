"""How many KV blocks the cache gets, and the one log line that says why.

The budget is ``kv_cache_tokens``, else ``kv_cache_memory_gib``, else what the device has left once the weights are
loaded: on a CPU a share of the available RAM (:func:`~amulet_core.engine.memory.cpu_kv_budget`), on a GPU what a
warm-up of the largest step leaves (``profile``: the runner's measured pass, :func:`gpu_budget`). The arithmetic
lives in :mod:`amulet_core.engine.memory`; this module decides which of it applies and words it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from amulet_core.engine.config import EngineConfig
from amulet_core.engine.memory import (
    CPU_KV_FRACTION,
    CPU_KV_MAX_GIB,
    DEFAULT_CONTEXT,
    CacheSize,
    available_ram,
    blocks_for,
    cpu_kv_budget,
    gib,
    gpu_kv_budget,
    longest_that_runs,
)

Profile = Callable[[int, int, int], tuple[int, int]]
"""(tokens of the step, the context it attends to, logits rows) -> (peak, now) bytes the CUDA allocator held."""


def kv_budget(
    config: EngineConfig,
    context: int | None,
    per_token: int,
    block_size: int,
    device: torch.device,
    weight_bytes: int,
    profile: Profile,
) -> tuple[int, str, int | None]:
    """(KV blocks the budget holds, the reason in words, the longest context the largest step attended to on a
    GPU): ``kv_cache_tokens``, else ``kv_cache_memory_gib``, else what the device has left now that the weights
    (``weight_bytes``) are loaded (on a GPU after a warm-up step, :func:`gpu_budget`)."""
    block_bytes = per_token * block_size
    if config.kv_cache_tokens is not None:
        return blocks_for(config.kv_cache_tokens, block_size), f"kv_cache_tokens {config.kv_cache_tokens}", None
    if config.kv_cache_memory_gib is not None:
        budget = int(config.kv_cache_memory_gib * (1 << 30))
        return budget // block_bytes, f"--kv-cache-memory-gib {config.kv_cache_memory_gib:g}", None
    weights = gib(weight_bytes)
    if device.type == "cuda":
        budget, why, attended = gpu_budget(config, context, weights, device, profile)
        return max(0, budget) // block_bytes, why, attended
    available = available_ram()
    budget = cpu_kv_budget(available)
    why = f"min({CPU_KV_FRACTION:g} x {gib(available)} of RAM available with {weights} of weights loaded, "
    why += f"{CPU_KV_MAX_GIB:g} GiB)"
    return budget // block_bytes, why, None


def gpu_budget(
    config: EngineConfig, context: int | None, weights: str, device: torch.device, profile: Profile
) -> tuple[int, str, int]:
    """(KV bytes, why, the context the warm-up step attended to) on a GPU. The warm-up is the largest step
    (``max_num_batched_tokens``) at the end of the longest context; when that runs out of memory and
    ``max_model_len`` is not set, the context is halved (down to the step's own length) and caps it."""
    tokens = config.batched_tokens("cuda")
    longest = config.max_model_len or context or DEFAULT_CONTEXT
    shortest = longest if config.max_model_len is not None else min(longest, tokens)

    def measure(length: int) -> tuple[int, int]:
        return profile(tokens, length, config.max_num_seqs)

    try:
        attended, (peak, allocated) = longest_that_runs(measure, longest, shortest, (torch.cuda.OutOfMemoryError,))
    except torch.cuda.OutOfMemoryError as exc:
        raise ValueError(
            f"A warm-up step of {tokens} tokens attending to a context of {shortest} runs out of GPU memory with "
            f"{weights} of weights loaded; lower --max-num-batched-tokens or --max-model-len."
        ) from exc
    free, total = torch.cuda.mem_get_info(device)
    budget = gpu_kv_budget(total, free, peak, allocated, config.gpu_memory_utilization)
    why = (
        f"{config.gpu_memory_utilization:g} x {gib(total)} of GPU memory - {gib(total - free)} in use with "
        f"{weights} of weights loaded - {gib(max(0, peak - allocated))} activation peak of a {tokens}-token step "
        f"attending to {attended} tokens"
    )
    return budget, why, attended


def describe_cache(
    size: CacheSize, why: str, per_token: int, block_size: int, config: EngineConfig, dtype: torch.dtype | None = None
) -> str:
    """The one log line that says what the cache and the context are (and in which ``dtype``), and why."""
    tokens = size.num_blocks * block_size
    held = f" of {str(dtype).removeprefix('torch.')}" if dtype is not None else ""
    line = (
        f"KV cache: {gib(tokens * per_token)}{held}, {size.num_blocks} blocks of {block_size} tokens "
        f"({tokens} tokens, {per_token / 1024:.1f} KiB a token) = {why}"
    )
    if size.blocks_capped:
        line += f", capped at what {config.max_num_seqs} sequences (max_num_seqs) of the longest context use"
    model = f"the model's context {size.model_context}" if size.model_context else "no context in the model's config"
    if config.max_model_len is not None:
        return f"{line}; max_model_len {size.max_model_len} (set; {model})"
    if size.step_context is not None and size.max_model_len == size.step_context:
        return (
            f"{line}; max_model_len {size.max_model_len}, below {model}: a {config.batched_tokens('cuda')}-token "
            f"step attending to a longer context ran out of GPU memory"
        )
    if size.context_capped:
        return (
            f"{line}; max_model_len {size.max_model_len}, below {model}: the cache holds one two-context "
            f"request of {size.max_model_len} tokens a context, no more (give it more memory for longer)"
        )
    return f"{line}; max_model_len {size.max_model_len} ({model})"
