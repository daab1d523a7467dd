"""The batch-invariant attention's compiled kernel (amulet_core/engine/fixed_order_kernel.py): the same bits at any
thread count, the agreement with SDPA in float64 (with a soft cap), how it is built, found and kept, and which
attention an engine picks. Its bits however a token is scheduled are checked beside the torch path's in
test_determinism.py (``test_attention_has_the_same_bits_however_a_token_is_scheduled``)."""

from __future__ import annotations

import logging

import pytest
import torch

from amulet_core.engine import fixed_order_kernel as kernel_module
from amulet_core.engine.config import EngineConfig
from amulet_core.engine.fixed_order_kernel import load_fixed_order_attention
from amulet_core.engine.invariant_attention import InvariantPlan, InvariantSpan, decode_plan, invariant_attention
from amulet_core.engine.llm_engine import LLMEngine
from amulet_core.engine.paged_attention import attention, causal_mask
from amulet_core.native import build


def _case(dtype: torch.dtype, kv: int = 3, group: int = 3, dim: int = 64, length: int = 200):
    torch.manual_seed(1)
    slots_total = 1024
    k_cache = torch.randn(kv, slots_total, dim).to(dtype)
    v_cache = torch.randn(kv, slots_total, dim).to(dtype)
    context = torch.randperm(slots_total)[:length]
    queries = torch.randn(1, kv * group, length, dim).to(dtype)
    return k_cache, v_cache, context, queries


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_token_has_the_same_bits_at_any_thread_count(fixed_order_kernel, dtype):
    """The work is split between threads by (token, head), never inside one: 1, 2 and 3 threads agree bitwise."""
    k_cache, v_cache, context, queries = _case(dtype)
    plan = InvariantPlan(None, (InvariantSpan.of(0, queries.shape[2], context),), fixed_order_kernel)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(invariant_attention(queries, k_cache, v_cache, plan, 0.125))
    finally:
        torch.set_num_threads(before)
    assert outs[0].dtype == dtype and outs[0].shape == (1, queries.shape[2], queries.shape[1], queries.shape[3])
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@pytest.mark.parametrize(("softcap", "window"), [(None, None), (5.0, None), (None, 50), (5.0, 50)])
def test_the_kernel_computes_attention(fixed_order_kernel, softcap, window):
    """Against float64 attention with the same soft cap and window, every position of a chunk and a decode row."""
    k_cache, v_cache, context, queries = _case(torch.float32, kv=2, group=2, dim=40)
    length, scale = context.shape[0], 0.4  # a large scale: the cap changes the scores
    plan = InvariantPlan(None, (InvariantSpan.of(0, length, context),), fixed_order_kernel)
    got = invariant_attention(queries, k_cache, v_cache, plan, scale, window, softcap)
    keys, values = k_cache[:, context].double().unsqueeze(0), v_cache[:, context].double().unsqueeze(0)
    mask = causal_mask(length, length, torch.device("cpu"), window)
    wanted = attention(queries.double(), keys, values, mask, scale, softcap or 1e30, gqa=True)
    torch.testing.assert_close(got.double(), wanted.transpose(1, 2), atol=1e-5, rtol=1e-5)
    tables = torch.cat([context, torch.zeros(56, dtype=torch.long)]).view(1, -1)  # one-slot blocks
    row = InvariantPlan(decode_plan(tables, torch.tensor([length]), 1, length), (), fixed_order_kernel)
    last = invariant_attention(queries[:, :, -1:], k_cache, v_cache, row, scale, window, softcap)
    assert torch.equal(last[0, 0], got[0, -1])


@pytest.mark.parametrize("storage", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("flags", [(), ("-mno-f16c",)], ids=["default", "no-f16c"])
def test_a_float32_models_16_bit_cache_reads_as_the_float32_values_it_holds(storage, flags, tmp_path):
    """A float32 model's float16 or bfloat16 cache (``--kv-cache-dtype``): each key and value is widened exactly and
    the float32 arithmetic follows, so the output has the bits of a float32 cache holding the same values - in the
    vector loops (head dims 64 and 128) and the generic ones (40), for prefill chunks and decode rows, with a window
    and a soft cap, at one and two threads; built with and without F16C (the scalar widening)."""
    library, why = build.load_library(kernel_module.SOURCE, tmp_path, flags)
    assert library is not None, why
    kernel = kernel_module.FixedOrderAttention(library)
    before = torch.get_num_threads()
    try:
        for dim, threads, (softcap, window) in [(64, 1, (None, None)), (128, 2, (5.0, 30)), (40, 2, (None, 30))]:
            torch.set_num_threads(threads)
            k_cache, v_cache, context, queries = _case(torch.float32, kv=2, group=3, dim=dim, length=150)
            k16, v16 = (k_cache * 4).to(storage), v_cache.to(storage)
            plan = InvariantPlan(None, (InvariantSpan.of(0, 150, context),), kernel)
            got = invariant_attention(queries, k16, v16, plan, 0.3, window, softcap)
            wanted = invariant_attention(queries, k16.float(), v16.float(), plan, 0.3, window, softcap)
            assert got.dtype == torch.float32 and torch.equal(got, wanted), (dim, threads)
            assert not torch.equal(got, invariant_attention(queries, k_cache * 4, v_cache, plan, 0.3, window, softcap))
    finally:
        torch.set_num_threads(before)


def test_a_cache_the_kernel_cannot_read_is_refused(fixed_order_kernel):
    """A bfloat16 model's float16 cache, or keys and values of two dtypes, are errors, not a guess."""
    k_cache, v_cache, context, queries = _case(torch.float32, kv=1, group=1, dim=8, length=4)
    plan = InvariantPlan(None, (InvariantSpan.of(0, 4, context),), fixed_order_kernel)
    with pytest.raises(ValueError, match="float16 cache with torch.bfloat16 queries"):
        invariant_attention(queries.bfloat16(), k_cache.half(), v_cache.half(), plan, 0.3)
    with pytest.raises(ValueError, match="one dtype"):
        invariant_attention(queries, k_cache.half(), v_cache, plan, 0.3)


def test_without_a_compiler_the_loader_says_why(monkeypatch, tmp_path):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(build, "COMPILERS", ("no-such-compiler-here",))
    kernel, why = load_fixed_order_attention(tmp_path)
    assert kernel is None and "no C compiler" in why
    assert not list(tmp_path.iterdir())


def test_a_source_that_does_not_compile_is_reported_and_nothing_is_kept(monkeypatch, tmp_path):
    broken = tmp_path / "broken.c"
    broken.write_text("int fixed_order_attention(void) { return undeclared_name; }\n")
    monkeypatch.setattr(kernel_module, "SOURCE", broken)
    kept = tmp_path / "kept"
    kernel, why = load_fixed_order_attention(kept)
    assert kernel is None and "did not build" in why and "undeclared_name" in why
    assert not list(kept.iterdir())  # no partial library left behind


def test_a_second_start_loads_the_library_built_by_the_first(monkeypatch, tmp_path):
    first, why = load_fixed_order_attention(tmp_path)
    assert first is not None and first.library.threaded, why
    assert [p.name for p in tmp_path.iterdir()] == [first.library.path.name]

    def no_build(*args):
        raise AssertionError("compiled again")

    monkeypatch.setattr(build, "_build", no_build)
    second, _ = load_fixed_order_attention(tmp_path)
    assert second is not None and second.library.path == first.library.path


def test_an_engine_on_the_cpu_attends_through_the_kernel_unless_told_otherwise(tiny_model):
    loaded = tiny_model("llama")
    config = EngineConfig(max_model_len=256, kv_cache_tokens=2048)
    assert LLMEngine(loaded, config).runner.attention_kernel is not None
    for other in (EngineConfig(max_model_len=256, kv_cache_tokens=2048, attention_backend="sdpa"),
                  EngineConfig(max_model_len=256, kv_cache_tokens=2048, deterministic=False)):  # fmt: skip
        assert LLMEngine(loaded, other).runner.attention_kernel is None
    with pytest.raises(ValueError, match="needs --deterministic"):
        LLMEngine(
            loaded, EngineConfig(max_model_len=256, kv_cache_tokens=2048, deterministic=False, attention_backend="fixed-order")
        )


def test_where_the_kernel_does_not_build_auto_warns_and_fixed_order_fails(tiny_model, monkeypatch, caplog):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(build, "COMPILERS", ("no-such-compiler-here",))
    loaded = tiny_model("llama")
    with caplog.at_level(logging.WARNING):
        engine = LLMEngine(loaded, EngineConfig(max_model_len=256, kv_cache_tokens=2048))
    assert engine.runner.attention_kernel is None
    assert "no C compiler" in caplog.text and "torch operations" in caplog.text
    with pytest.raises(ValueError, match="fixed-order: no C compiler"):
        LLMEngine(loaded, EngineConfig(max_model_len=256, kv_cache_tokens=2048, attention_backend="fixed-order"))


def test_the_kernels_exp_is_within_an_ulp_or_so_and_the_same_in_vector_and_tail(fixed_order_kernel):
    """The attention's weights come from the kernel's own exp (eight at a time, the rest one by one): against
    float64 exp within 1.5 units in the last place over the range softmax uses (scores minus the largest, so at
    most 0), a value given the same bits by the vector form and the one-by-one tail, 0 below float's least normal
    power of two and for -inf, NaN kept."""
    import ctypes

    function = fixed_order_kernel.library.function("attention_exp", None, [ctypes.c_void_p, ctypes.c_int64, ctypes.c_float])

    def kernel_exp(values: torch.Tensor, best: float = 0.0) -> torch.Tensor:
        out = values.clone().contiguous()
        function(out.data_ptr(), out.numel(), best)
        return out

    x = -torch.rand(200_003, generator=torch.Generator().manual_seed(5), dtype=torch.float64).float() * 87.0
    got = kernel_exp(x)
    exact = torch.exp(x.double())
    ulp = (torch.nextafter(exact.float(), torch.tensor(float("inf"))) - exact.float()).double()
    assert ((got.double() - exact).abs() / ulp).max() <= 1.5
    for i in range(0, x.numel(), 97):  # one value alone goes through the one-by-one form
        assert torch.equal(kernel_exp(x[i : i + 1]), got[i : i + 1])
    assert torch.equal(kernel_exp(x + 2.5, best=2.5), kernel_exp(x + 2.5 - 2.5))
    for value, want in ((float("-inf"), 0.0), (-87.4, 0.0), (-1000.0, 0.0), (0.0, 1.0), (-87.3, 1.2192e-38)):
        for out in (kernel_exp(torch.tensor([value])), kernel_exp(torch.full((8,), value))):
            assert torch.allclose(out, torch.tensor(want), rtol=1e-4, atol=0) and (want > 0 or out.eq(0).all())
    assert kernel_exp(torch.tensor([float("nan")])).isnan().all() and kernel_exp(torch.full((8,), float("nan"))).isnan().all()
