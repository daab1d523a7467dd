"""How much KV cache and context the machine allows: the arithmetic (pure functions) and the memory probes.

The cache takes what is left after the weights (:class:`~amulet_core.engine.model_runner.ModelRunner` calls
these once the model is loaded):

* on a GPU, as vLLM and nano-vllm do: ``utilization x total`` device memory, less what is in use after the
  weights are loaded (the weights, the CUDA context, other processes), less the activation peak of a warm-up
  forward pass of the largest step (:func:`gpu_kv_budget`);
* on a CPU, ``CPU_KV_FRACTION`` of the available RAM, at most ``CPU_KV_MAX_GIB`` (:func:`cpu_kv_budget`);
* never more than ``max_num_seqs`` full-length sequences can use (:func:`size_cache`).

``max_model_len`` defaults to the model's own context (:func:`model_context_length`), capped so that the cache
holds one full-length request of ``FULL_CONTEXTS`` contexts (:func:`longest_context`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

GIB = 1 << 30

CPU_KV_FRACTION = 0.25
"""Share of the available RAM the KV cache takes on a CPU. RAM is shared with everything else on the machine (the
weights already loaded, activations, tokenizers, other servers: the test machine runs several at once), unlike a
GPU given to the server."""
CPU_KV_MAX_GIB = 2.0
"""Most KV cache on a CPU by default: the fixed size it had before it was sized from memory, so no CPU deployment
takes more than it did. A CPU's speed, not its RAM, bounds what it serves at once: 2 GiB holds 93k tokens of
SmolLM2-135M's KV in bfloat16 (11 full 8,192-token contexts), more than a CPU prefills in a minute.
``--kv-cache-memory-gib`` sets more."""
GPU_MEMORY_UTILIZATION = 0.9
"""Default share of a GPU's total memory the server uses (weights, activations and KV cache), as vLLM's."""
FULL_CONTEXTS = 2
"""The cache must hold one request of this many contexts, each ``max_model_len`` tokens long: an amulet or la
request (one preference and the contrast context). A request of more contexts that cannot fit at its length is
refused with the numbers (:func:`request_kv_blocks`), and one of fewer always fits."""
MIN_MODEL_LEN = 16
"""The shortest ``max_model_len`` the engine runs with."""
DEFAULT_CONTEXT = 2048
"""The context of a model whose config names none (vLLM's fallback too)."""
CONTEXT_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_seq_len",
    "seq_length",
    "max_sequence_length",
    "max_seq_length",
    "seq_len",
)
"""Where transformers' configs keep a model's context length (the first found wins)."""


def blocks_for(tokens: int, block_size: int) -> int:
    """Blocks that hold ``tokens`` token positions."""
    return -(-tokens // block_size)


def model_context_length(config: Any) -> int | None:
    """The context length a (text) model config declares, or None when it declares none."""
    for key in CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def gpu_kv_budget(total: int, free: int, peak_allocated: int, allocated: int, utilization: float) -> int:
    """Bytes for the KV cache on a GPU of ``total`` bytes with ``free`` bytes free once the weights are loaded and a
    warm-up pass has run (its cached blocks released): ``utilization x total``, less what is in use (weights, CUDA
    context, other processes: ``total - free``), less the warm-up's activation peak (``peak_allocated -
    allocated``: what the allocator held at most above what it holds now). Negative when nothing is left."""
    in_use = total - free
    activations = max(0, peak_allocated - allocated)
    return int(total * utilization) - in_use - activations


def cpu_kv_budget(available: int, fraction: float = CPU_KV_FRACTION, max_gib: float = CPU_KV_MAX_GIB) -> int:
    """Bytes for the KV cache on a CPU with ``available`` bytes of RAM available once the weights are loaded."""
    return min(int(available * fraction), int(max_gib * GIB))


def longest_context(num_blocks: int, block_size: int, contexts: int = FULL_CONTEXTS) -> int:
    """The longest ``max_model_len`` for which ``num_blocks`` hold one request of ``contexts`` contexts at full
    length. A context of ``L`` tokens (prompt and answer) holds at most ``L`` positions at once (the last token
    sampled is never fed back), ``ceil(L / block_size)`` blocks, and no block is counted as shared."""
    return (num_blocks // contexts) * block_size


@dataclass(frozen=True)
class CacheSize:
    """What :func:`size_cache` chose."""

    num_blocks: int
    max_model_len: int
    model_context: int | None
    """The model's own context length (None: its config names none)."""
    blocks_capped: bool
    """The budget held more blocks than ``max_num_seqs`` full-length sequences use."""
    step_context: int | None = None
    """The longest context the largest step attended to within memory (a GPU's warm-up), when below the model's."""

    @property
    def context_capped(self) -> bool:
        """``max_model_len`` is below the model's context because the cache holds no more."""
        return self.max_model_len < min(self.model_context or DEFAULT_CONTEXT, self.step_context or 1 << 62)


def size_cache(
    budget_blocks: int,
    block_size: int,
    max_num_seqs: int,
    model_context: int | None,
    max_model_len: int | None = None,
    contexts: int = FULL_CONTEXTS,
    step_context: int | None = None,
) -> CacheSize:
    """The KV blocks and ``max_model_len`` for a budget of ``budget_blocks`` blocks: the budget, at most what
    ``max_num_seqs`` sequences of the longest context use; ``max_model_len`` as given, else the model's context
    (``DEFAULT_CONTEXT`` when it names none) capped by ``step_context`` (the longest context the largest step
    attended to within memory) and by :func:`longest_context`. Raises ValueError when a given ``max_model_len``
    is above the model's context or the cache's, or when the cache holds no request of ``MIN_MODEL_LEN`` tokens."""
    if max_model_len is not None and model_context is not None and max_model_len > model_context:
        raise ValueError(
            f"max_model_len {max_model_len} is above the model's context length ({model_context} tokens); "
            "lower --max-model-len or leave it out (it defaults to the model's)."
        )
    longest = max_model_len or min(model_context or DEFAULT_CONTEXT, step_context or 1 << 62)
    most = max_num_seqs * (blocks_for(longest, block_size) + 1)
    num_blocks = max(0, min(budget_blocks, most))
    room = longest_context(num_blocks, block_size, contexts)
    length = longest if max_model_len is not None else min(longest, room)
    if length > room or length < MIN_MODEL_LEN:
        raise ValueError(
            f"The KV cache ({num_blocks} blocks of {block_size} tokens) cannot hold one {contexts}-context request "
            f"of {max(length, MIN_MODEL_LEN)} tokens a context (max_model_len); give it more memory "
            "(--kv-cache-memory-gib, or --gpu-memory-utilization on a GPU) or lower --max-model-len."
        )
    step = step_context if step_context is not None and step_context < (model_context or DEFAULT_CONTEXT) else None
    return CacheSize(num_blocks, length, model_context, budget_blocks > most, step)


def longest_that_runs(
    run: Callable[[int], T], longest: int, shortest: int, errors: tuple[type[BaseException], ...]
) -> tuple[int, T]:
    """``(length, run(length))`` for the longest ``length`` from ``longest`` down, halving, to ``shortest`` that
    ``run`` takes without raising one of ``errors`` (a GPU's warm-up step out of memory); the error of
    ``shortest`` when even that fails."""
    while True:
        try:
            return longest, run(longest)
        except errors:
            if longest <= shortest:
                raise
            longest = max(shortest, longest // 2)


def shared_blocks(tokens: Sequence[int], leader: Sequence[int], block_size: int) -> int:
    """Full blocks at the start of ``tokens`` equal to ``leader``'s, short of either one's last token: the blocks
    the block manager lets a context share with its request's first context (``BlockManager._shared_with``)."""
    limit = (min(len(tokens), len(leader)) - 1) // block_size
    n = 0
    while n < limit:
        lo, hi = n * block_size, (n + 1) * block_size
        if tuple(tokens[lo:hi]) != tuple(leader[lo:hi]):
            break
        n += 1
    return n


def request_kv_blocks(contexts: Sequence[Sequence[int]], new_tokens: int, block_size: int) -> int:
    """Blocks a request holds at its peak, alone in the cache, counted as the block manager counts them: each
    context is given ``prompt + 1`` positions when admitted and grows to ``prompt + new_tokens - 1`` (the last
    token sampled is never fed back); a context's leading full blocks equal to the first context's are held once."""
    leader = contexts[0]
    total = 0
    for i, ids in enumerate(contexts):
        total += blocks_for(max(len(ids) + 1, len(ids) + new_tokens - 1), block_size)
        if i:
            total -= shared_blocks(ids, leader, block_size)
    return total


def fitting_new_tokens(contexts: Sequence[Sequence[int]], most: int, num_blocks: int, block_size: int) -> int:
    """The most new tokens (up to ``most``) with which the request fits ``num_blocks`` blocks; 0 when even one
    does not fit. :func:`request_kv_blocks` grows with the new tokens, so a binary search finds it."""
    lo, hi = 0, most
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if request_kv_blocks(contexts, mid, block_size) <= num_blocks:
            lo = mid
        else:
            hi = mid - 1
    return lo


def available_ram() -> int:
    """Bytes of RAM available to this process: ``MemAvailable`` of ``/proc/meminfo`` (else the free pages), or what
    the cgroup (a container's memory limit) still allows when that is less."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        available = None
    if available is None:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    limit = _cgroup_room()
    return available if limit is None else min(available, limit)


def _cgroup_room() -> int | None:
    """What the cgroup v2 memory limit still allows (``memory.max - memory.current``), or None without one."""
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((root / "memory.current").read_text().strip()))
    except (OSError, ValueError):
        return None


def gib(n: float) -> str:
    """Bytes as GiB for the log."""
    return f"{n / GIB:.2f} GiB"
