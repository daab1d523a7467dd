"""``--kv-cache-dtype``: a float32 model's keys and values held in float16 (or bfloat16) - half the bytes a token, so
twice the tokens in the same memory - and read as the float32 values they are, by every attention path; the
batch-invariant ones keep their promise (a request answers as cold after a prefix-cache hit and in a busy batch)."""

from __future__ import annotations

import pytest
import torch

from amulet_core.engine.config import EngineConfig
from amulet_core.engine.invariant_attention import InvariantPlan, InvariantSpan, invariant_attention
from amulet_core.engine.llm_engine import LLMEngine
from amulet_core.method.settings import Method
from server.options import parse_args
from tests.engine.test_determinism import Recorder, alone, assert_same, engine_for, random_request


def test_the_cache_dtype_is_the_models_unless_a_float32_model_asks_for_16_bits():
    assert EngineConfig().cache_dtype(torch.float32) == torch.float32
    assert EngineConfig().cache_dtype(torch.bfloat16) == torch.bfloat16
    assert EngineConfig(kv_cache_dtype="float16").cache_dtype(torch.float32) == torch.float16
    assert EngineConfig(kv_cache_dtype="bfloat16").cache_dtype(torch.float32) == torch.bfloat16
    assert EngineConfig(kv_cache_dtype="bfloat16").cache_dtype(torch.bfloat16) == torch.bfloat16
    for asked in ("float16", "float32"):
        with pytest.raises(ValueError, match=f"--kv-cache-dtype {asked}: a bfloat16 model's cache holds its own dtype"):
            EngineConfig(kv_cache_dtype=asked).cache_dtype(torch.bfloat16)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kv_cache_dtype is out of range"):
        EngineConfig(kv_cache_dtype="int8")  # type: ignore[arg-type]


def test_the_flag_reaches_the_engine_config():
    assert parse_args([], environ={}).engine.kv_cache_dtype == "auto"
    assert parse_args(["--kv-cache-dtype", "float16"], environ={}).engine.kv_cache_dtype == "float16"
    with pytest.raises(SystemExit):
        parse_args(["--kv-cache-dtype", "fp8"], environ={})


def test_a_float16_cache_holds_twice_the_tokens_in_the_same_memory(tiny_model, caplog):
    loaded = tiny_model("llama")
    sized = {
        kind: EngineConfig(max_model_len=256, kv_cache_memory_gib=0.002, kv_cache_dtype=kind) for kind in ("auto", "float16")
    }
    with caplog.at_level("INFO"):
        wide, narrow = (LLMEngine(loaded, config).runner for config in sized.values())
    assert wide.cache.keys[0].dtype == torch.float32 and narrow.cache.values[-1].dtype == torch.float16
    assert narrow.num_blocks in (2 * wide.num_blocks, 2 * wide.num_blocks + 1)
    assert "KV cache: " in caplog.text and " of float16, " in caplog.text


@pytest.mark.parametrize("storage", ["float16", "bfloat16"])
@pytest.mark.parametrize("attention", ["auto", "sdpa", "nondeterministic"])
def test_a_16_bit_cache_is_read_as_the_values_it_holds(tiny_model, storage, attention):
    """Each path (the fixed-order kernel, the batch-invariant torch operations, SDPA) gives logits near the float32
    cache's - not the same bits: the keys and values were rounded once, as they were written."""
    loaded = tiny_model("llama")
    settings = {"deterministic": False} if attention == "nondeterministic" else {"attention_backend": attention}
    request = random_request("r", 3, 150, Method.AMULET, max_tokens=6)
    wide = alone(loaded, request, **settings)
    narrow = alone(loaded, request, kv_cache_dtype=storage, **settings)
    assert narrow.logits.shape == wide.logits.shape
    assert not torch.equal(narrow.logits, wide.logits)
    tolerance = 0.05 if storage == "float16" else 1.0  # logits up to ~10; bfloat16 keeps 8 bits, float16 11
    assert (narrow.logits[:2] - wide.logits[:2]).abs().max() < tolerance  # the first steps, before tokens may part


@pytest.mark.parametrize("attention", ["auto", "sdpa"])
def test_a_float16_cache_keeps_the_batch_invariance(tiny_model, attention):
    """With --deterministic (a CPU's default), a request answers with the same bits cold, after another that shares
    its long prefix (a prefix-cache hit) and beside a busy batch."""
    loaded = tiny_model("llama")
    settings = {"kv_cache_dtype": "float16", "attention_backend": attention}
    mine = random_request("mine", 11, 300, Method.AMULET, max_tokens=8)
    cold = alone(loaded, mine, **settings)
    recorder = Recorder(engine_for(loaded, **settings))
    recorder.engine.add_request(random_request("other", 11, 300, Method.BASE, max_tokens=3))
    recorder.drain()
    for i in range(3):
        recorder.engine.add_request(random_request(f"busy-{i}", 20 + i, 90 + 40 * i, Method.BASE, max_tokens=20))
    recorder.step()
    recorder.engine.add_request(random_request("mine", 11, 300, Method.AMULET, max_tokens=8))
    recorder.drain()
    answer = recorder.answer("mine")
    assert answer.cached_tokens > 0
    assert_same(answer, cold)


@pytest.mark.parametrize("storage", [torch.float16, torch.bfloat16])
def test_the_torch_operations_read_a_16_bit_cache_as_the_float32_values_it_holds(storage):
    """The batch-invariant attention's torch path (no kernel): a float32 model's 16-bit cache gives the bits of a
    float32 cache holding the same values (float32 products, not a bfloat16 model's)."""
    generator = torch.Generator().manual_seed(4)
    keys, values = (torch.randn(2, 512, 64, generator=generator).to(storage) for _ in range(2))
    queries = torch.randn(1, 6, 40, 64, generator=generator)
    context = torch.randperm(512, generator=generator)[:170]
    plan = InvariantPlan(None, (InvariantSpan.of(0, 40, context),))
    got = invariant_attention(queries, keys, values, plan, 0.125)
    assert got.dtype == torch.float32
    assert torch.equal(got, invariant_attention(queries, keys.float(), values.float(), plan, 0.125))
