"""Weight-only quantization of the linear layers (``--quantization``, issue 29 item 1): int8 per output and int4 in
groups of 32 through torch's CPU kernels, a Q4 GGUF model's 4-bit weights recovered exactly, the products those
of the dequantized weights, a row's bits independent of the other rows, the engine's deterministic forward still
deterministic, the dense weights gone, and the combinations that cannot run refused with a message."""

from __future__ import annotations

import copy

import pytest
import torch

from amulet_core.engine.invariant_ops import ONEDNN_LINEAR_DTYPES
from amulet_core.method.settings import Method
from amulet_core.model import loading
from amulet_core.model.chat_template import render_chat
from amulet_core.model.four_bit import GROUP, four_bit_codes
from amulet_core.model.gguf_cache import default_model_cache
from amulet_core.model.loading import LoadedModel, ModelConfig, load_model
from amulet_core.model.q4_linear import Q4Linear
from amulet_core.model.q8_output import Q8Linear
from amulet_core.model.quantization import (
    INT4_KERNEL,
    INT8_KERNEL,
    Int4Linear,
    Int8Linear,
    QuantizationError,
    int4_linear,
    int8_linear,
    layer_bytes,
    quantize_model,
    resolve_quantization,
)
from tests.engine.test_determinism import alone, assert_same, beside_busy_requests, contexts, greedy

pytestmark = pytest.mark.skipif(not (INT4_KERNEL and INT8_KERNEL), reason="this torch lacks the int4/int8 CPU kernels")
CPU = torch.device("cpu")


def q4_1(out_features: int, in_features: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, float32 weight ``d * q + m`` per group of 32 inputs, d and m float16 as in a Q4_1 GGUF)."""
    gen = torch.Generator().manual_seed(seed)
    groups = in_features // GROUP
    codes = torch.randint(0, 16, (out_features, in_features), generator=gen, dtype=torch.int32)
    codes[:, ::GROUP] = 0  # every group has its lowest and its highest level, as Q4_1 picks d and m
    codes[:, 1::GROUP] = 15
    step = (torch.rand(out_features, groups, generator=gen) * 0.02 + 0.002).half().float()
    lowest = (-torch.rand(out_features, groups, generator=gen) * 0.1).half().float()
    weight = codes.view(out_features, groups, GROUP).float() * step[..., None] + lowest[..., None]
    return codes, weight.view(out_features, in_features)


def linear(weight: torch.Tensor, bias: bool = False) -> torch.nn.Linear:
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias, dtype=weight.dtype)
    layer.weight.data = weight
    if bias:
        layer.bias.data = torch.randn(weight.shape[0]).to(weight.dtype)
    return layer


def four_bit_decoder(model: torch.nn.Module) -> int:
    """Give the decoder layers' linear weights 4-bit values (Q4_1's, in the model's dtype); how many."""
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            rows, columns = module.weight.shape
            module.weight.data = q4_1(rows, columns, seed=count)[1].to(module.weight.dtype)
            count += 1
    return count


def quantized(base: LoadedModel, method: str, dtype: torch.dtype = torch.bfloat16) -> LoadedModel:
    model = copy.deepcopy(base.model).to(dtype)
    report = quantize_model(model, method)
    assert report.layers > 0
    return LoadedModel(model, base.tokenizer, base.name, base.device, dtype, base.eos_token_ids, report)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_codes_of_a_4_bit_weight_are_recovered_exactly(dtype):
    codes, weight = q4_1(96, 4 * GROUP)
    found = four_bit_codes(weight.to(dtype), exact_only=True)
    assert found is not None
    assert torch.equal(found[0], codes)


def q4_k(rows: int, blocks: int) -> torch.Tensor:
    """A float32 weight ``[rows, 256 * blocks]`` dequantized by gguf-py from random Q4_K blocks (a super-block
    scale d and min dmin, 6-bit sub-block scales and mins, 4-bit codes): sub-blocks of 32 whose codes need not
    reach both 0 and 15, as in a Q4_K_M GGUF's layers."""
    import numpy as np
    from gguf import GGMLQuantizationType, quants

    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(rows, blocks, 144), dtype=np.uint8)
    raw[:, :, 0:2] = np.frombuffer(np.float16(0.0005).tobytes(), np.uint8)  # d
    raw[:, :, 2:4] = np.frombuffer(np.float16(0.0002).tobytes(), np.uint8)  # dmin
    raw[:, :, 4:8] |= 0xE0  # sub-block scales of 32 to 63: steps a fit Q4_K picks, not vanishing ones
    return torch.from_numpy(quants.dequantize(raw.reshape(rows, -1), GGMLQuantizationType.Q4_K).copy())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_q4_k_weight_is_found_4_bit_though_its_groups_do_not_span_16_levels(dtype):
    weight = q4_k(64, 2).to(dtype)
    groups = weight.float().view(64, -1, GROUP)
    spans_all = (groups - groups.amin(-1, keepdim=True)) / ((groups.amax(-1) - groups.amin(-1)) / 15).unsqueeze(-1)
    assert float((spans_all - spans_all.round()).abs().amax()) > 0.4  # min/max alone would not find it
    found = four_bit_codes(weight, exact_only=True)
    assert found is not None
    codes, step, lowest = found
    rebuilt = lowest.repeat_interleave(GROUP, 1) + step.repeat_interleave(GROUP, 1) * codes.float()
    if dtype == torch.float32:
        assert torch.equal(rebuilt, weight)  # gguf-py's values, exactly
    else:  # the bfloat16 copy's values, to within its rounding
        assert float((rebuilt - weight.float()).abs().max()) <= 2**-8 * float(weight.float().abs().max())
    layer = int4_linear(linear(weight), exact_only=True)
    assert layer is not None and layer[1]


def test_weights_that_are_not_4_bit_are_quantized_only_when_asked():
    random = torch.randn(64, 2 * GROUP).to(torch.bfloat16)
    assert four_bit_codes(random, exact_only=True) is None
    assert four_bit_codes(random, exact_only=False) is not None
    assert four_bit_codes(torch.randn(64, GROUP + 16), exact_only=False) is None  # not whole groups
    _, weight = q4_1(64, 2 * GROUP)
    weight[3, 5] += 0.4 * (weight[3, 1] - weight[3, 0]) / 15  # one weight between two levels
    assert four_bit_codes(weight, exact_only=True) is None
    assert int4_linear(linear(q4_1(24, 2 * GROUP)[1]), exact_only=False) is None  # the kernel takes 16, 32, ... outputs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_an_int4_layer_multiplies_by_the_4_bit_weights(dtype):
    _, weight = q4_1(192, 576)
    layer = linear(weight.to(dtype), bias=True)
    found = int4_linear(layer, exact_only=True)
    assert found is not None and found[1]
    x = torch.randn(1, 5, 576).to(dtype)
    want = x[0].double() @ weight.double().t() + layer.bias.double()
    got = found[0](x)
    assert got.shape == (1, 5, 192) and got.dtype == dtype
    # bfloat16 inside the layer (activations, scales, output): a few roundings of it
    torch.testing.assert_close(got[0].double(), want, atol=2e-2 * float(want.abs().max()), rtol=0)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_a_quantized_layer_stays_close_to_the_dense_one(method):
    """Round to nearest on random weights: int8 within about 1%, int4 (16 levels a group) within about 10%."""
    weight = torch.randn(256, 512) * 0.05
    layer = linear(weight, bias=True)
    found = int8_linear(layer) if method == "int8" else int4_linear(layer, exact_only=False)
    assert found is not None
    q = found if isinstance(found, Int8Linear) else found[0]
    assert isinstance(q, Int8Linear if method == "int8" else Int4Linear)
    x = torch.randn(7, 512)
    want = layer(x)
    error = float((q(x) - want).norm() / want.norm())
    assert error < (0.02 if method == "int8" else 0.12), error
    assert error > 1e-4  # it did round


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_a_row_has_the_same_bits_among_any_rows(method, threads):
    _, weight = q4_1(1536, 576)
    layer = int8_linear(linear(weight)) if method == "int8" else int4_linear(linear(weight), exact_only=True)[0]  # type: ignore[index]
    rows = torch.randn(300, 576).to(torch.bfloat16)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        alone_ = torch.cat([layer(rows[i : i + 1]) for i in range(20)])
        for count in (2, 3, 4, 5, 8, 17, 64, 65, 300):
            assert torch.equal(layer(rows[:count])[:20], alone_[: min(count, 20)]), count
    finally:
        torch.set_num_threads(before)


def test_every_linear_layer_but_the_output_one_is_replaced_and_its_weight_freed(tiny_model):
    base = tiny_model("llama")
    dense = [m for m in base.model.modules() if isinstance(m, torch.nn.Linear)]
    for method, kind in (("int8", Int8Linear), ("int4", Int4Linear), ("int4-q16", Q4Linear)):
        model = copy.deepcopy(base.model).to(torch.bfloat16)
        report = quantize_model(model, method)
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        assert linears == [model.get_output_embeddings()]
        assert report.layers == len(dense) - 1 == sum(isinstance(m, kind) for m in model.modules())
        assert report.exact_layers == 0  # random weights: quantized, not recovered
        assert report.quantized_bytes < report.dense_bytes / (1.9 if method == "int8" else 3.0)
        shapes = [m.weight.shape for m in dense if m is not base.model.get_output_embeddings()]
        assert report.quantized_bytes == sum(layer_bytes(o, i, method) for o, i in shapes)
        assert report.dense_bytes == sum(layer_bytes(o, i, "none") for o, i in shapes)


def test_auto_replaces_only_the_layers_that_are_already_4_bit(tiny_model):
    model = copy.deepcopy(tiny_model("llama").model).to(torch.bfloat16)
    count = four_bit_decoder(model)
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    first.weight.data = torch.randn_like(first.weight)  # no longer 4-bit
    report = quantize_model(model, "int4", exact_only=True)
    assert report.layers == report.exact_layers == count - 1 > 0


def test_the_choices_resolve_per_device_and_dtype():
    assert resolve_quantization("auto", CPU, torch.bfloat16, gguf=True) == "int4-q16"
    assert resolve_quantization("auto", CPU, torch.float32, gguf=True) == "none"  # float32 asked for: exact products
    assert resolve_quantization("auto", CPU, torch.float32, gguf=True, dtype_chosen=True) == "int4-q16"  # no native bf16
    assert resolve_quantization("auto", CPU, torch.float16, gguf=True, dtype_chosen=True) == "none"
    assert resolve_quantization("auto", CPU, torch.bfloat16, gguf=False) == "none"
    assert resolve_quantization("auto", torch.device("cuda"), torch.bfloat16, gguf=True) == "none"
    assert resolve_quantization("int8", CPU, torch.float32, gguf=False) == "int8"
    for method in ("int8", "int4"):
        with pytest.raises(QuantizationError, match=f"--quantization {method} runs on the CPU only"):
            resolve_quantization(method, torch.device("cuda"), torch.bfloat16, gguf=False)
    with pytest.raises(QuantizationError, match="must be one of"):
        resolve_quantization("fp8", CPU, torch.bfloat16, gguf=False)
    with pytest.raises(ValueError, match="quantization"):
        ModelConfig(quantization="awq")


def test_on_a_cpu_without_native_bf16_the_default_load_is_float32_with_the_ggufs_int4_layers(monkeypatch, smollm):
    """``--dtype auto`` picks float32 there, and ``--quantization auto`` still multiplies the GGUF's 4-bit layers as
    4-bit (the compiled int4-q16 kernel) and its 8-bit output layer as 8-bit blocks; the same greedy answer as the
    session's float32 model, which was asked for by name and keeps its dense layers."""
    monkeypatch.setattr(loading, "cpu_has_native_bf16", lambda: False)
    loaded = load_model(ModelConfig(model_cache=default_model_cache()))
    assert loaded.dtype == torch.float32 and loaded.quantization.method == "int4-q16"
    assert loaded.quantization.layers == loaded.quantization.exact_layers == 7 * 30
    assert isinstance(loaded.model.get_output_embeddings(), Q8Linear)  # its Q8_0 output layer as 8-bit blocks
    assert smollm.quantization.method == "none"
    assert isinstance(smollm.model.get_output_embeddings(), torch.nn.Linear)
    ids = render_chat(smollm.tokenizer, [{"role": "user", "content": "What is the capital of France?"}])
    prompt = torch.tensor([ids])
    with torch.inference_mode():
        quantized = loaded.model.generate(prompt, max_new_tokens=8, do_sample=False)[0, len(ids) :]
        dense = smollm.model.generate(prompt, max_new_tokens=8, do_sample=False)[0, len(ids) :]
    assert "Paris" in smollm.tokenizer.decode(quantized)
    assert quantized.tolist() == dense.tolist()


def test_the_loader_quantizes_a_model_folder(tiny_model_folder):
    loaded = load_model(ModelConfig(model=tiny_model_folder, dtype="float32", quantization="int8"))
    assert loaded.quantization.method == "int8" and loaded.quantization.layers > 0
    assert any(isinstance(m, Int8Linear) for m in loaded.model.modules())
    plain = load_model(ModelConfig(model=tiny_model_folder, dtype="bfloat16"))
    assert plain.quantization.layers == 0  # auto: a folder has no 4-bit weights


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("decoding", [Method.BASE, Method.AMULET], ids=lambda m: m.value)
def test_a_request_answers_as_cold_in_a_busy_batch_and_on_a_cache_hit(tiny_model, method, decoding):
    """The deterministic forward with quantized layers: alone, beside other requests (its prompt chunked), and
    again on a prefix-cache hit, the same bits."""
    loaded = quantized(tiny_model("llama"), method)
    request = greedy("mine", contexts(loaded.tokenizer, decoding), decoding)
    cold = alone(loaded, request)
    recorder = beside_busy_requests(loaded, request, Method.AMULET)
    assert recorder.engine.runner.invariant_weights is not None
    # only the output layer is packed for oneDNN (where oneDNN has a bfloat16 product: AVX512 or AVX-NE-CONVERT)
    assert len(recorder.engine.runner.invariant_weights) == (1 if loaded.dtype in ONEDNN_LINEAR_DTYPES else 0)
    assert_same(recorder.answer("mine"), cold)
    recorder.engine.add_request(greedy("again", contexts(loaded.tokenizer, decoding), decoding))
    recorder.drain()
    again = recorder.answer("again")
    assert again.cached_tokens > 0
    assert_same(again, cold)
