"""Linear layers whose weights are already 4-bit multiply by torch's int4 CPU kernel (issue 28, item 6): the codes
are recovered exactly from the loaded weights, the product is the dequantized weight's, a row's bits do not
depend on the other rows, and the engine's deterministic forward stays deterministic with them (the bfloat16
SmolLM2 cases of tests/engine/test_determinism.py run with them too, by default)."""

from __future__ import annotations

import copy

import pytest
import torch

from amulet_core.engine.config import EngineConfig
from amulet_core.engine.int4_weights import GROUP, INT4_KERNEL, four_bit_codes, int4_layers, int4_linear, int4_weight
from amulet_core.engine.invariant_ops import batch_invariant, invariant_weights
from amulet_core.engine.llm_engine import LLMEngine
from amulet_core.engine.protocol import GenerationRequest
from amulet_core.method.preference_prompts import Placement, preference_contexts
from amulet_core.method.settings import Method, MethodSettings
from amulet_core.model.chat_template import ChatTokenizer
from amulet_core.model.loading import LoadedModel
from amulet_core.sampling.params import SamplingParams
from tests.engine.test_determinism import Recorder, alone, assert_same, contexts, engine_for, greedy, random_request
from tests.engine.test_engine import drain

pytestmark = pytest.mark.skipif(not INT4_KERNEL, reason="this torch has no int4 CPU kernel")


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


def quantize_layers(model: torch.nn.Module) -> int:
    """Give the decoder layers' linear weights 4-bit values (Q4_1's, in the model's dtype); how many."""
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            _, weight = q4_1(*module.weight.shape, seed=count)
            module.weight.data = weight.to(module.weight.dtype)
            count += 1
    return count


@pytest.fixture(scope="module")
def four_bit_llama(tiny_model) -> tuple[LoadedModel, int]:
    """The tiny Llama in bfloat16 with 4-bit decoder weights, and how many layers have them."""
    base = tiny_model("llama")
    model = copy.deepcopy(base.model).to(torch.bfloat16)
    count = quantize_layers(model)
    return LoadedModel(model, base.tokenizer, base.name, base.device, torch.bfloat16, base.eos_token_ids), count


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_codes_of_a_4_bit_weight_are_recovered_exactly(dtype):
    codes, weight = q4_1(96, 4 * GROUP)
    found = four_bit_codes(weight.to(dtype))
    assert found is not None
    assert torch.equal(found[0], codes)


def test_weights_that_are_not_4_bit_are_left_alone():
    assert four_bit_codes(torch.randn(64, 2 * GROUP).to(torch.bfloat16)) is None
    assert four_bit_codes(torch.randn(64, GROUP + 16)) is None  # not whole groups
    _, weight = q4_1(64, 2 * GROUP)
    weight[3, 5] += 0.4 * (weight[3, 1] - weight[3, 0]) / 15  # one weight between two levels
    assert four_bit_codes(weight) is None
    assert int4_weight(torch.randn(64, 2 * GROUP, dtype=torch.float16)) is None
    assert int4_weight(q4_1(24, 2 * GROUP)[1]) is None  # the kernel takes 16, 32, ... outputs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_int4_product_is_the_dequantized_weights(dtype):
    _, weight = q4_1(192, 576 // GROUP * GROUP)
    int4 = int4_weight(weight.to(dtype))
    assert int4 is not None
    x = torch.randn(5, weight.shape[1]).to(dtype)
    bias = torch.randn(weight.shape[0]).to(dtype)
    want = x.double() @ weight.double().t() + bias.double()
    got = int4_linear(x.unsqueeze(0), int4, bias)
    assert got.shape == (1, 5, weight.shape[0]) and got.dtype == dtype
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-4  # bfloat16: the output's and the scales' roundings
    torch.testing.assert_close(got[0].double(), want, atol=tolerance * float(want.abs().max()), rtol=0)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_row_has_the_same_bits_among_any_rows(dtype, threads):
    _, weight = q4_1(1536, 576)
    int4 = int4_weight(weight.to(dtype))
    assert int4 is not None
    rows = torch.randn(300, 576).to(dtype)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        alone_ = torch.cat([int4_linear(rows[i : i + 1], int4) for i in range(20)])
        for count in (2, 3, 4, 5, 8, 17, 64, 65, 300):
            assert torch.equal(int4_linear(rows[:count], int4)[:20], alone_[: min(count, 20)]), count
    finally:
        torch.set_num_threads(before)


def test_the_deterministic_forward_uses_the_int4_kernel(four_bit_llama):
    loaded, count = four_bit_llama
    assert len(int4_layers(loaded.model)) == count > 0
    weights = invariant_weights(copy.deepcopy(loaded.model), 1 << 40, int4=True)
    assert weights.int4_layers == count
    ids = torch.tensor([[5, 80, 900, 3, 17]])
    model = copy.deepcopy(loaded.model)
    with_int4 = invariant_weights(model, 1 << 40, int4=True)
    without = invariant_weights(copy.deepcopy(loaded.model), 1 << 40, int4=False)
    assert without.int4_layers == 0
    with torch.inference_mode(), batch_invariant(with_int4):
        fast = model(input_ids=ids).logits
    with torch.inference_mode(), batch_invariant(without):
        plain = model(input_ids=ids).logits
    assert not torch.equal(fast, plain)  # the int4 kernel ran: other roundings
    torch.testing.assert_close(fast.float(), plain.float(), atol=0.1 * float(plain.abs().max()), rtol=0)


def test_the_engine_picks_int4_for_a_bfloat16_cpu_model_only(four_bit_llama):
    loaded, count = four_bit_llama
    assert engine_for(loaded).runner.invariant_weights.int4_layers == count
    assert engine_for(loaded, int4_weights=False).runner.invariant_weights.int4_layers == 0
    assert engine_for(loaded, deterministic=False).runner.invariant_weights is None
    config = EngineConfig()
    assert config.int4_weights_on("cpu", torch.bfloat16)
    assert not config.int4_weights_on("cpu", torch.float32)
    assert not config.int4_weights_on("cuda", torch.bfloat16)
    assert EngineConfig(int4_weights=True).int4_weights_on("cpu", torch.float32)


@pytest.mark.parametrize("method", [Method.BASE, Method.AMULET], ids=lambda m: m.value)
def test_a_request_answers_as_cold_in_a_busy_batch_with_int4_weights(four_bit_llama, method):
    """Alone, again on a prefix-cache hit, and beside other requests (its prompt chunked): the same bits."""
    loaded, _ = four_bit_llama
    request = greedy("mine", contexts(loaded.tokenizer, method), method)
    cold = alone(loaded, request)
    recorder = Recorder(engine_for(loaded, max_num_batched_tokens=48))
    for i, length in enumerate((9, 70, 150)):
        recorder.engine.add_request(random_request(f"busy-{i}", i, length, Method.AMULET, max_tokens=30))
    recorder.step()
    recorder.engine.add_request(request)
    recorder.drain()
    assert_same(recorder.answer("mine"), cold)
    recorder.engine.add_request(greedy("again", contexts(loaded.tokenizer, method), method))
    recorder.drain()
    again = recorder.answer("again")
    assert again.cached_tokens > 0
    assert_same(again, cold)


def test_the_embedded_smollm_in_bfloat16_has_int4_layers(smollm):
    """SmolLM2-135M's GGUF is Q4_1: every decoder projection (7 a layer, 30 layers) is found 4-bit; its output
    layer (the Q8_0 token embedding) is not."""
    model = copy.deepcopy(smollm.model).to(torch.bfloat16)
    layers = int4_layers(model)
    assert len(layers) == 7 * 30
    assert model.get_output_embeddings() not in layers


def test_the_embedded_smollm_with_int4_weights_answers_paris_with_a_preference(smollm):
    """Quality kept (issue 29 item 3): in bfloat16 with the int4 kernel (the CPU default there), greedy ``amulet``
    with the concise preference still answers the README's question."""
    model = copy.deepcopy(smollm.model).to(torch.bfloat16)
    loaded = LoadedModel(model, smollm.tokenizer, smollm.name, smollm.device, torch.bfloat16, smollm.eos_token_ids)
    engine = LLMEngine(loaded, EngineConfig(max_model_len=512, kv_cache_tokens=4096))
    assert engine.runner.invariant_weights is not None and engine.runner.invariant_weights.int4_layers == 7 * 30
    question = [{"role": "user", "content": "What is the capital of France?"}]
    built = preference_contexts(question, ["concise"], "You are a helpful assistant.", placement=Placement.END)
    renderer = ChatTokenizer(smollm.tokenizer)
    contexts = [renderer.encode_chat(c) for c in built.decoded_by(Method.AMULET)]
    sampling = SamplingParams(max_tokens=24, temperature=0)
    request = GenerationRequest.from_contexts("paris", contexts, sampling, MethodSettings(method=Method.AMULET))
    engine.add_request(request)
    text = "".join(o.text for o in drain(engine)["paris"])
    assert "Paris" in text, text
