"""The Llama family's own forward pass gives transformers' bits: every step's logits and the whole KV cache.

Two engines run the same requests (prefill chunks, prefix-cache hits, decode rows side by side, amulet's two
contexts, past a sliding window and past the first key block): one with the family forward the runner picks,
one with transformers' forward put back. Each step's logits and, at the end, every cached key and value must be
equal bit for bit, in float32 and bfloat16, batch-invariant or not.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch

from amulet_core.engine.config import EngineConfig
from amulet_core.engine.llm_engine import LLMEngine
from amulet_core.engine.packed_forward import LlamaFamilyForward, TransformersForward, packed_forward
from amulet_core.engine.protocol import GenerationRequest
from amulet_core.method.settings import Method, MethodSettings
from amulet_core.model.loading import LoadedModel
from amulet_core.model.q4_linear import Q4Linear
from amulet_core.model.q8_output import q8_output_layer
from amulet_core.model.quantization import Int4Linear, quantize_model
from amulet_core.sampling.params import SamplingParams
from benchmarks.host_overhead import TINY_MODEL_FIELDS
from tests.engine.device import build_tiny_template_family_model

WINDOW = 24
"""A sliding window shorter than the prompts, so that the windowed families mask keys."""


def family_config(family: str, vocab_size: int) -> Any:
    """A tiny config of ``family``; Mistral and Qwen2 with a sliding window (Qwen2's on its second layer only)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common: dict[str, Any] = {**TINY_MODEL_FIELDS, "vocab_size": vocab_size}
    if family == "llama":
        return LlamaConfig(**common, attention_bias=True, mlp_bias=True)
    if family == "mistral":
        return MistralConfig(**common, sliding_window=WINDOW)
    if family == "qwen2":
        return Qwen2Config(**common, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)
    if family == "qwen3":
        return Qwen3Config(**common, head_dim=16)
    raise ValueError(family)


def tiny(family: str, tokenizer: Any, dtype: torch.dtype, **overrides: Any) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(7)
    config = family_config(family, len(tokenizer))
    for name, value in overrides.items():
        setattr(config, name, value)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model = model.to(dtype=dtype).eval()
    return LoadedModel(model, tokenizer, f"tiny-{family}", torch.device("cpu"), dtype, frozenset({2}))


def requests(vocab: int, new_tokens: int) -> list[GenerationRequest]:
    """Amulet and base requests; two share a long prefix (a prefix-cache hit), one is long (past a key block)."""
    gen = torch.Generator().manual_seed(3)

    def ids(n: int) -> list[int]:
        return torch.randint(10, vocab, (n,), generator=gen).tolist()

    shared = ids(70)
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True, logprobs=True, top_logprobs=2)
    amulet = MethodSettings(method=Method.AMULET)
    base = MethodSettings(method=Method.BASE)
    return [
        GenerationRequest("a", tuple(shared + ids(9)), params, amulet, tuple(shared + ids(3))),
        GenerationRequest("b", tuple(ids(150)), params, base),
        GenerationRequest("c", tuple(shared + ids(5)), params, base),
    ]


def run(loaded: LoadedModel, deterministic: bool, forward: Callable[[Any], Any] | None, new_tokens: int):
    """Every step's logits, the outputs and the final KV cache of the requests run on a fresh engine, with
    ``forward(model)`` as the runner's forward when given."""
    config = EngineConfig(
        max_model_len=512,
        kv_cache_tokens=2048,
        max_num_batched_tokens=64,  # prompts are prefilled in chunks of a step's budget
        deterministic=deterministic,
        contrast_logits="all",  # every row's whole logits, as transformers' forward gives them
    )
    engine = LLMEngine(loaded, config)
    if forward is not None:
        engine.runner.forward = forward(loaded.model)
    logits: list[torch.Tensor] = []
    run_step = engine.runner.run

    def recorded(*args: Any, **kwargs: Any) -> torch.Tensor:
        out = run_step(*args, **kwargs)
        logits.append(out.clone())
        return out

    engine.runner.run = recorded  # type: ignore[method-assign]
    reqs = requests(len(loaded.tokenizer), new_tokens)
    engine.add_request(reqs[0])
    engine.add_request(reqs[1])
    outputs = []
    steps = 0
    while engine.has_work():
        outputs.extend((o.request_id, o.token_ids, o.logprobs) for o in engine.step())
        steps += 1
        if steps == 3:
            engine.add_request(reqs[2])  # joins while the others decode, after the shared prefix is cached
    cache = engine.runner.cache
    return logits, outputs, [k.clone() for k in cache.keys], [v.clone() for v in cache.values]


def assert_same_bits(loaded: LoadedModel, deterministic: bool, new_tokens: int = 12) -> None:
    picked = LLMEngine(loaded, EngineConfig(max_model_len=512, kv_cache_tokens=1024)).runner.forward
    assert isinstance(picked, LlamaFamilyForward)  # else this test would compare transformers with itself
    family = run(loaded, deterministic, None, new_tokens)
    plain = run(loaded, deterministic, TransformersForward, new_tokens)
    assert len(family[0]) == len(plain[0]) > new_tokens
    for step, (got, want) in enumerate(zip(family[0], plain[0], strict=True)):
        assert torch.equal(got, want), f"step {step}: logits differ"
    assert family[1] == plain[1]
    for got_cache, want_cache in ((family[2], plain[2]), (family[3], plain[3])):
        assert all(torch.equal(g, w) for g, w in zip(got_cache, want_cache, strict=True))


@pytest.mark.parametrize("deterministic", [True, False], ids=["invariant", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_the_family_forward_gives_transformers_bits(family, dtype, deterministic, smollm_tokenizer):
    assert_same_bits(tiny(family, smollm_tokenizer, dtype), deterministic)


@pytest.mark.parametrize("method", ["int4", "int4-q16"])
@pytest.mark.parametrize("deterministic", [True, False], ids=["invariant", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fused_int4_projections_give_the_separate_layers_bits(family, dtype, deterministic, method, smollm_tokenizer):
    """Int4 layers of one input (query, key and value; gate and up) run fused: bits of the separate layers, which
    transformers' forward calls (Qwen2's projections have biases); in float32 too, where the int4 layers compute
    in bfloat16 and return float32 (int4-q16's: in float32, 16-bit inputs, returning the model's dtype)."""
    loaded = tiny(family, smollm_tokenizer, dtype, num_key_value_heads=4)  # keys of 64 outputs: whole blocks
    quantize_model(loaded.model, method)
    kind = Q4Linear if method == "int4-q16" else Int4Linear
    assert all(isinstance(layer.self_attn.q_proj, kind) for layer in loaded.model.model.layers)
    forward = packed_forward(loaded.model)
    assert isinstance(forward, LlamaFamilyForward)
    assert all(layer.qkv is not None and layer.gate_up is not None for layer in forward.layers)
    assert_same_bits(loaded, deterministic)


@pytest.mark.smollm
@pytest.mark.parametrize("method", ["int4", "int4-q16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_the_served_smollm_int4_gives_transformers_bits(smollm, dtype, method):
    """As ``make serve`` runs it: bfloat16 (a CPU with native bfloat16) or float32 (one without, where the Q8_0 output
    layer is also multiplied as 8-bit blocks), its Q4_1 layers on torch's int4 kernel or (``auto``'s choice) the
    compiled int4-q16 one, batch-invariant."""
    model = copy.deepcopy(smollm.model).to(dtype)
    assert quantize_model(model, method, exact_only=True).exact_layers == 7 * 30
    assert any(isinstance(m, Q4Linear if method == "int4-q16" else Int4Linear) for m in model.modules())
    assert (q8_output_layer(model) is not None) == (dtype == torch.float32)
    loaded = LoadedModel(model, smollm.tokenizer, smollm.name, smollm.device, dtype, smollm.eos_token_ids)
    assert_same_bits(loaded, deterministic=True, new_tokens=6)


@pytest.mark.parametrize("family", ["gemma2", "phi3"])
def test_other_families_keep_transformers_forward(family, smollm_tokenizer):
    loaded = build_tiny_template_family_model(family, smollm_tokenizer)
    assert isinstance(packed_forward(loaded.model), TransformersForward)


def test_a_hook_on_any_module_keeps_transformers_forward(smollm_tokenizer):
    """A hook (an offloading or a tracing library's) runs only through ``nn.Module.__call__``: transformers'
    forward keeps it running."""
    loaded = tiny("llama", smollm_tokenizer, torch.float32)
    assert isinstance(packed_forward(loaded.model), LlamaFamilyForward)
    layer: Any = loaded.model.model.layers[1]
    for module in (layer.mlp.up_proj, layer.self_attn, loaded.model.model.norm):
        handle = module.register_forward_hook(lambda *args: None)
        assert isinstance(packed_forward(loaded.model), TransformersForward)
        handle.remove()
    layer.input_layernorm.forward = lambda hidden: hidden  # patched on the instance
    assert isinstance(packed_forward(loaded.model), TransformersForward)


@pytest.mark.smollm
def test_the_benchmark_measures_both_forwards_on_both_methods(tmp_path):
    """``python -m benchmarks.packed_forward`` (one short round): a CPU time a token for every forward and method,
    and the profile of the family forward's step."""
    import json

    from benchmarks.packed_forward import main

    out = tmp_path / "packed_forward.json"
    main(["--rounds", "1", "--steps", "2", "--profile", "--out", str(out)])
    report = json.loads(out.read_text())
    assert set(report["ms_per_token"]) == {"transformers", "family"}
    assert all(ms > 0 for per in report["ms_per_token"].values() for ms in per.values())
    ops = {row["op"] for row in report["profile_base_family"]}
    assert ops >= {"aten::cat", "aten::mul"}, sorted(ops)  # the signed sine's, the activation's product (every op kept)
