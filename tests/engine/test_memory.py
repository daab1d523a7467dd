"""The KV cache and context sized to the machine (:mod:`amulet_core.engine.memory`): the arithmetic, no GPU, no model."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from amulet_core.engine.block_manager import BlockManager
from amulet_core.engine.memory import (
    CPU_KV_MAX_GIB,
    DEFAULT_CONTEXT,
    GIB,
    available_ram,
    cpu_kv_budget,
    fitting_new_tokens,
    gpu_kv_budget,
    longest_context,
    longest_that_runs,
    model_context_length,
    request_kv_blocks,
    size_cache,
)
from amulet_core.engine.sequence import Sequence


def test_a_gpu_gives_its_share_less_what_is_in_use_and_the_activation_peak() -> None:
    # 80 GiB card, 20 GiB in use after the weights (16 GiB of them ours), the warm-up peaked 2 GiB above that.
    budget = gpu_kv_budget(total=80 * GIB, free=60 * GIB, peak_allocated=18 * GIB, allocated=16 * GIB, utilization=0.9)
    assert budget == 72 * GIB - 20 * GIB - 2 * GIB
    # Another process holding 30 GiB more leaves that much less; a low share leaves nothing.
    assert gpu_kv_budget(80 * GIB, 30 * GIB, 18 * GIB, 16 * GIB, 0.9) == 20 * GIB
    assert gpu_kv_budget(80 * GIB, 60 * GIB, 18 * GIB, 16 * GIB, 0.25) < 0
    # A peak below what is held now (freed weights copies) is no activation.
    assert gpu_kv_budget(80 * GIB, 60 * GIB, 10 * GIB, 16 * GIB, 0.5) == 40 * GIB - 20 * GIB


def test_a_cpu_gives_a_quarter_of_the_available_ram_at_most_two_gib() -> None:
    assert cpu_kv_budget(4 * GIB) == 1 * GIB
    assert cpu_kv_budget(2 * GIB) == GIB // 2
    assert cpu_kv_budget(24 * GIB) == int(CPU_KV_MAX_GIB * GIB) == 2 * GIB
    assert available_ram() > 0


def test_the_model_context_comes_from_its_config() -> None:
    from transformers import GPT2Config, LlamaConfig

    assert model_context_length(LlamaConfig(max_position_embeddings=8192)) == 8192
    assert model_context_length(GPT2Config(n_positions=1024)) == 1024
    assert model_context_length(SimpleNamespace(seq_length=32768)) == 32768
    assert model_context_length(SimpleNamespace(hidden_size=64)) is None
    assert model_context_length(SimpleNamespace(max_position_embeddings=None, n_positions=0)) is None


def test_max_model_len_is_the_models_context_when_the_cache_holds_two_such_contexts() -> None:
    size = size_cache(budget_blocks=5825, block_size=16, max_num_seqs=32, model_context=8192)
    assert (size.num_blocks, size.max_model_len, size.blocks_capped, size.context_capped) == (5825, 8192, False, False)
    # Exactly two full contexts: 2 x 512 blocks.
    assert size_cache(1024, 16, 32, 8192).max_model_len == 8192


def test_max_model_len_is_capped_by_what_the_cache_holds() -> None:
    size = size_cache(budget_blocks=700, block_size=16, max_num_seqs=32, model_context=8192)
    assert size.max_model_len == longest_context(700, 16) == 350 * 16
    assert size.context_capped and size.num_blocks == 700
    assert 2 * -(-size.max_model_len // 16) <= 700 < 2 * -(-(size.max_model_len + 16) // 16)


def test_the_cache_never_exceeds_what_max_num_seqs_full_contexts_use() -> None:
    size = size_cache(budget_blocks=10**6, block_size=16, max_num_seqs=4, model_context=8192)
    assert size.num_blocks == 4 * (512 + 1) and size.blocks_capped and size.max_model_len == 8192
    # A set max_model_len sizes the cap.
    assert size_cache(10**6, 16, 4, 8192, max_model_len=512).num_blocks == 4 * (32 + 1)


def test_a_gpu_step_that_attends_to_no_longer_context_caps_max_model_len() -> None:
    tried: list[int] = []

    def warm_up(length: int) -> str:
        tried.append(length)
        if length > 20_000:
            raise MemoryError
        return "measured"

    assert longest_that_runs(warm_up, 131072, 4096, (MemoryError,)) == (16384, "measured")
    assert tried == [131072, 65536, 32768, 16384]
    with pytest.raises(MemoryError):  # not below the shortest
        longest_that_runs(warm_up, 131072, 65536, (MemoryError,))
    size = size_cache(10**6, 16, 32, model_context=131072, step_context=16384)
    assert (size.max_model_len, size.step_context, size.context_capped) == (16384, 16384, False)
    assert size_cache(10**6, 16, 32, 8192, step_context=8192).step_context is None  # attended to all of it
    assert size_cache(10**6, 16, 32, 131072, max_model_len=65536, step_context=65536).max_model_len == 65536


def test_a_model_without_a_context_gets_the_default() -> None:
    size = size_cache(10**6, 16, 32, model_context=None)
    assert size.max_model_len == DEFAULT_CONTEXT and not size.context_capped


def test_a_set_max_model_len_wins_within_the_model_and_the_cache() -> None:
    assert size_cache(700, 16, 32, 8192, max_model_len=2048).max_model_len == 2048
    with pytest.raises(ValueError, match="above the model's context length"):
        size_cache(10**6, 16, 32, 8192, max_model_len=16384)
    with pytest.raises(ValueError, match="cannot hold one 2-context request of 8192 tokens"):
        size_cache(700, 16, 32, 8192, max_model_len=8192)
    # The old rule on kv_cache_tokens: 128 tokens in blocks of 4 hold two contexts of 64.
    assert size_cache(32, 4, 8, 4096, max_model_len=64).max_model_len == 64
    with pytest.raises(ValueError):
        size_cache(31, 4, 8, 4096, max_model_len=64)


def test_a_cache_too_small_for_any_request_fails() -> None:
    with pytest.raises(ValueError, match="give it more memory"):
        size_cache(1, 16, 32, 8192)
    with pytest.raises(ValueError):
        size_cache(0, 16, 32, 8192)


def _peak_blocks(contexts: list[list[int]], new_tokens: int, block_size: int) -> int:
    """The blocks a request holds at its peak in a real BlockManager, grown as the scheduler grows it."""
    blocks = BlockManager(10_000, block_size)
    seqs = [Sequence(list(ids)) for ids in contexts]
    blocks.allocate(seqs)
    peak = blocks.num_used
    for step in range(new_tokens):
        for seq in seqs:  # _make_room before the step, then the sampled token is appended
            blocks.ensure_capacity(seq, len(seq.token_ids))
        peak = max(peak, blocks.num_used)
        if step < new_tokens - 1:
            for seq in seqs:
                seq.token_ids.append(7)
    return peak


@pytest.mark.parametrize("seed", range(6))
def test_a_requests_need_is_counted_as_the_block_manager_counts_it(seed: int) -> None:
    rng = random.Random(seed)
    block_size = rng.choice([1, 4, 16])
    head = [rng.randrange(10, 500) for _ in range(rng.randrange(0, 80))]
    contexts = [head + [rng.randrange(10, 500) for _ in range(rng.randrange(1, 40))] for _ in range(rng.randrange(1, 4))]
    for new_tokens in (1, 2, 3, 17, 40):
        assert request_kv_blocks(contexts, new_tokens, block_size) == _peak_blocks(contexts, new_tokens, block_size)


def test_shared_leading_blocks_are_counted_once() -> None:
    head = list(range(100, 164))  # four full blocks of 16
    contexts = [head + [1, 2, 3], head + [4, 5], head + [6]]
    alone = [request_kv_blocks([c], 10, 16) for c in contexts]
    assert request_kv_blocks(contexts, 10, 16) == sum(alone) - 2 * 4


def test_the_most_new_tokens_that_fit() -> None:
    contexts = [list(range(100)), list(range(200, 300)), list(range(400, 500))]
    fits = fitting_new_tokens(contexts, 1000, 32, 16)
    assert request_kv_blocks(contexts, fits, 16) <= 32 < request_kv_blocks(contexts, fits + 1, 16)
    assert fits == 61  # 3 x ceil((100 + 61 - 1) / 16) = 30 blocks; 62 would take 3 x 11
    assert fitting_new_tokens(contexts, 20, 32, 16) == 20
    assert fitting_new_tokens(contexts, 20, 20, 16) == 0


@pytest.mark.parametrize("deterministic", [False, True], ids=["sdpa", "invariant"])
@pytest.mark.parametrize(("num_tokens", "longest"), [(48, 100), (48, 20)], ids=["chunk-at-the-end", "side-by-side"])
def test_the_start_up_warm_up_runs_the_largest_step_over_a_cache_of_its_own(tiny_model, deterministic, num_tokens, longest):
    """What a GPU measures its activations with (``ModelRunner.warm_up``: :func:`largest_step`), run here: one chunk
    ending a longer context, or contexts side by side; the positions are each token's, and the engine's own KV cache
    is left as it was."""
    import torch

    from amulet_core.engine.config import EngineConfig
    from amulet_core.engine.llm_engine import LLMEngine
    from amulet_core.engine.warm_up import largest_step

    runner = LLMEngine(tiny_model("llama"), EngineConfig(kv_cache_tokens=1024, deterministic=deterministic)).runner
    batch, positions = largest_step(
        runner.kv_shape, runner.block_size, runner.dtype, runner.device, deterministic, num_tokens, longest
    )
    want = list(range(longest - num_tokens, longest)) if longest >= num_tokens else [p % longest for p in range(num_tokens)]
    assert positions == want and batch.cache is not runner.cache and (batch.invariant is not None) == deterministic
    before = [k.clone() for k in runner.cache.keys]
    runner.warm_up(num_tokens, longest, logits_rows=4)
    assert all(torch.equal(k, b) for k, b in zip(runner.cache.keys, before, strict=True))
