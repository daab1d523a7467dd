"""The int4-q16 layers (amulet_core/model/q4_linear.py, amulet_core/native/q4_linear.c): the product against a float64
one of the same 16-bit inputs, a row's bits among any rows and threads, layers fused with each layer's bits,
``--quantization int4-q16`` on a 4-bit model and on the served SmolLM2, and what happens without a compiler."""

from __future__ import annotations

import copy
import logging
import pickle

import pytest
import torch
from torch import nn

from amulet_core.model.chat_template import render_chat
from amulet_core.model.four_bit import four_bit_codes
from amulet_core.model.q4_linear import Q4Linear, fuse_q4, half_blocks
from amulet_core.model.quantization import INT4_KERNEL, Int4Linear, QuantizationError, quantize_model, resolve_quantization
from amulet_core.native import build
from amulet_core.native.build import load_library


def four_bit(out_features: int, in_features: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weight, codes, steps, lowest) of a Q4_1-like weight: ``lowest + step * code`` per block of 32 inputs, every
    block's codes reaching 0 and 15."""
    generator = torch.Generator().manual_seed(seed)
    blocks = in_features // 32
    codes = torch.randint(0, 16, (out_features, blocks, 32), generator=generator)
    codes[..., 0], codes[..., 1] = 0, 15
    steps = (torch.rand(out_features, blocks, generator=generator) * 0.01 + 1e-3).half().float()
    lowest = (-torch.rand(out_features, blocks, generator=generator) * 0.08).half().float()
    weight = lowest.unsqueeze(-1) + steps.unsqueeze(-1) * codes.float()
    return weight.view(out_features, in_features), codes.view(out_features, in_features), steps, lowest


def sixteen_bit_inputs(x: torch.Tensor) -> torch.Tensor:
    """``x`` [rows, in] as the kernel quantizes it (blocks of 32: scale max |x| / 32767, codes round-to-even of
    x * (32767 / max |x|)), dequantized in float64."""
    blocks = x.float().view(x.shape[0], -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    inverse = torch.where(amax > 0, 32767 / amax, torch.zeros_like(amax))
    codes = torch.round(blocks * inverse).clamp(-32767, 32767)
    return (codes.double() * (amax / 32767).double()).view_as(x)


@pytest.fixture(scope="module")
def library():
    found, why = load_library(build.SOURCES / "q4_linear.c")
    if found is None:
        pytest.fail(why)
    return found


def test_the_layer_computes_the_product_of_its_16_bit_inputs(library):
    weight, codes, steps, lowest = four_bit(64, 160, seed=1)
    layer = Q4Linear.of(codes, steps, lowest, library)  # the steps and lowest values are float16 numbers
    x = torch.randn(2, 3, 160)
    x[0, 0, 32:64] = 0  # a block of zeros: scale 0
    got = layer(x)
    assert got.shape == (2, 3, 64) and got.dtype == torch.float32
    wanted = sixteen_bit_inputs(x.view(6, 160)) @ weight.double().T
    torch.testing.assert_close(got.view(6, 64).double(), wanted, atol=2e-5, rtol=1e-5)
    exact = x.view(6, 160).double() @ weight.double().T  # what the 16-bit inputs lose: a few 1e-5 here
    assert 0 < float((got.view(6, 64).double() - exact).abs().max()) < 2e-4
    bf16 = x.to(torch.bfloat16)
    assert layer(bf16).dtype == torch.bfloat16 and torch.equal(layer(bf16), layer(bf16.float()).to(torch.bfloat16))


def test_a_bias_is_added_and_shapes_it_cannot_take_are_refused(library):
    _, codes, steps, lowest = four_bit(16, 64, seed=4)
    bias = torch.randn(16)
    x = torch.randn(3, 64)
    plain = Q4Linear.of(codes, steps, lowest, library)
    assert torch.equal(Q4Linear.of(codes, steps, lowest, library, bias)(x), plain(x) + bias)
    with pytest.raises(ValueError, match="outputs in eights"):
        Q4Linear.of(codes[:12], steps[:12], lowest[:12], library)


@pytest.mark.parametrize("outputs", [256, 40])  # whole work items of 128 outputs, and a last pair with one group
def test_a_row_has_the_same_bits_among_any_rows_and_at_any_thread_count(library, outputs):
    _, codes, steps, lowest = four_bit(outputs, 96, seed=2)
    layer = Q4Linear.of(codes, steps, lowest, library)
    x = torch.randn(9, 96)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = torch.cat([layer(x[i : i + 1]) for i in range(9)])
        together = layer(x)
        pairs = torch.cat([layer(x[i : i + 2]) for i in range(0, 9, 2)])
        triples = torch.cat([layer(x[i : i + 3]) for i in range(0, 9, 3)])
        fours = torch.cat([layer(x[:4]), layer(x[4:8]), layer(x[8:])])
        torch.set_num_threads(2)
        threaded = layer(x)
        torch.set_num_threads(3)
        three = layer(x[1:])
    finally:
        torch.set_num_threads(before)
    assert torch.equal(alone, together) and torch.equal(alone, pairs) and torch.equal(alone, threaded)
    assert torch.equal(alone, triples) and torch.equal(alone, fours)
    assert torch.equal(alone[1:], three)


def test_fused_layers_give_each_layers_bits_and_share_its_weights(library):
    layers = [Q4Linear.of(*four_bit(n, 64, seed=n)[1:], library, torch.randn(n)) for n in (48, 16, 24)]
    x = torch.randn(5, 64)
    apart = torch.cat([layer(x) for layer in layers], dim=-1)
    fused = fuse_q4(layers)
    assert fused is not None and fused.out_features == 88
    assert torch.equal(fused(x), apart)
    assert torch.equal(torch.cat([layer(x) for layer in layers], dim=-1), apart)  # each layer now a view
    assert layers[1].weights.data_ptr() == fused.weights[6:].data_ptr()
    mixed = [layers[0], Q4Linear.of(*four_bit(8, 64)[1:], library)]  # a bias on one only
    assert fuse_q4(mixed) is None


def test_a_cpu_without_avx2_computes_the_same_products(library, tmp_path):
    """The kernel's code for a CPU without AVX2, FMA or F16C (integer products one by one, float16 converted in
    software): the same integer sums, so its products are the AVX2 build's up to the roundings of its unfused
    multiply-adds; a row alone or among others the same bits."""
    plain, why = load_library(build.SOURCES / "q4_linear.c", tmp_path, extra_flags=("-mno-avx2", "-mno-fma", "-mno-f16c"))
    if plain is None:
        pytest.fail(why)
    weight, codes, steps, lowest = four_bit(40, 96, seed=7)
    x = torch.randn(5, 96)
    native = Q4Linear.of(codes, steps, lowest, library)(x)
    layer = Q4Linear.of(codes, steps, lowest, plain)
    assert torch.equal(layer(x[2:3]), layer(x)[2:3]) and torch.equal(layer(x[:2]), layer(x)[:2])
    torch.testing.assert_close(layer(x), native, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer(x).double(), sixteen_bit_inputs(x) @ weight.double().T, atol=2e-5, rtol=1e-5)


def test_a_copied_or_pickled_layer_computes_alike(library):
    layer = Q4Linear.of(*four_bit(32, 64, seed=3)[1:], library)
    x = torch.randn(3, 64)
    copied, unpickled = copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))
    assert copied.library is library and unpickled.library.source == library.source
    assert torch.equal(copied(x), layer(x)) and torch.equal(unpickled(x), layer(x))


class TwoLayers(nn.Module):
    def __init__(self, first: torch.Tensor, second: torch.Tensor) -> None:
        super().__init__()
        self.first = nn.Linear(first.shape[1], first.shape[0], bias=False)
        self.second = nn.Linear(second.shape[1], second.shape[0])
        self.first.weight.data, self.second.weight.data = first, second


def test_quantize_model_int4_q16_recovers_4_bit_layers_exactly():
    four = four_bit(32, 64, seed=5)[0]
    model = TwoLayers(four, torch.randn(16, 32))
    report = quantize_model(model, "int4-q16", exact_only=True)
    assert (report.method, report.layers, report.exact_layers) == ("int4-q16", 1, 1)
    assert isinstance(model.first, Q4Linear) and isinstance(model.second, nn.Linear)
    x = torch.randn(2, 64)
    torch.testing.assert_close(model.first(x).double(), sixteen_bit_inputs(x) @ four.double().T, atol=2e-5, rtol=1e-5)
    rounded = TwoLayers(four, torch.randn(16, 32))
    assert quantize_model(rounded, "int4-q16").layers == 2  # any weight rounded to 16 levels without exact_only


def test_a_weight_that_is_not_4_bit_keeps_its_codes_with_float16_steps():
    weight = torch.randn(16, 64)
    codes, steps, lowest = four_bit_codes(weight, exact_only=False)
    steps16, lowest16 = half_blocks(steps, lowest)
    assert steps16.dtype == lowest16.dtype == torch.float16
    rebuilt = lowest16.float().repeat_interleave(32, 1) + steps16.float().repeat_interleave(32, 1) * codes.float()
    off = (rebuilt - weight).abs() / steps.repeat_interleave(32, 1)
    assert 0.45 < float(off.max()) <= 0.5 + 15 * 2**-11  # the codes' rounding, and 15 float16 roundings of a step


def test_auto_chooses_int4_q16_for_a_gguf_model_on_the_cpu():
    cpu = torch.device("cpu")
    assert resolve_quantization("auto", cpu, torch.float32, gguf=True, dtype_chosen=True) == "int4-q16"
    assert resolve_quantization("auto", cpu, torch.bfloat16, gguf=True) == "int4-q16"
    assert resolve_quantization("auto", cpu, torch.float32, gguf=True) == "none"  # float32 asked for by name
    assert resolve_quantization("auto", cpu, torch.bfloat16, gguf=False) == "none"
    with pytest.raises(QuantizationError, match="CPU only"):
        resolve_quantization("int4-q16", torch.device("cuda"), torch.bfloat16, gguf=True)


def test_without_a_compiler_int4_q16_is_refused_or_auto_falls_back(monkeypatch, caplog, tmp_path):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(build, "COMPILERS", ("no-such-compiler-here",))
    monkeypatch.setenv(build.KERNEL_CACHE_ENV, str(tmp_path))
    four = four_bit(32, 64, seed=6)[0]
    with pytest.raises(QuantizationError, match="no C compiler"):
        quantize_model(TwoLayers(four, torch.randn(16, 32)), "int4-q16")
    model = TwoLayers(four, torch.randn(16, 32))
    with caplog.at_level(logging.WARNING):
        report = quantize_model(model, "int4-q16", exact_only=True, fallback=True)
    assert report.method == ("int4" if INT4_KERNEL else "none")
    assert isinstance(model.first, Int4Linear if INT4_KERNEL else nn.Linear)
    assert "instead of int4-q16" in caplog.text and "no C compiler" in caplog.text


@pytest.mark.smollm
def test_the_served_smollm_answers_as_its_float32_model_with_int4_q16(smollm):
    """SmolLM2's 210 Q4_1 projections, dequantized to float32 by transformers, are recovered exactly (its float16
    steps and lowest values); with 16-bit inputs its logits stay within a few thousandths of the float32 model's and the
    greedy answers are the float32 model's, word for word (8-bit inputs, llama.cpp's arithmetic, answered the first
    question "L'Étoile, la Cité, ...")."""
    model = copy.deepcopy(smollm.model)
    report = quantize_model(model, "int4-q16", exact_only=True)
    assert (report.layers, report.exact_layers) == (210, 210)
    assert report.quantized_bytes == report.dense_bytes // 4 * 20 // 32  # 20 bytes a block of 32, as the GGUF
    for question in ("What is the capital of France?", "Write a haiku about the sea.", "Give me three tips for sleeping better."):
        ids = render_chat(smollm.tokenizer, [{"role": "user", "content": question}])
        prompt = torch.tensor([ids])
        with torch.inference_mode():
            logits = model(prompt).logits[0, -1]
            dense = smollm.model(prompt).logits[0, -1]
            answer = model.generate(prompt, max_new_tokens=16, do_sample=False)[0, len(ids) :]
            wanted = smollm.model.generate(prompt, max_new_tokens=16, do_sample=False)[0, len(ids) :]
        assert 0 < float((logits - dense).abs().max()) < 0.02
        assert answer.tolist() == wanted.tolist(), smollm.tokenizer.decode(answer)
