"""Gemma 2's soft-capped attention (``attn_logit_softcapping``: every scaled score ``s`` becomes ``c * tanh(s / c)``)
in each of the engine's attention paths: the batch-invariant one (the CPU default: its compiled kernel, or torch
operations), the SDPA-based one (where SDPA has no soft cap, computed step by step), and a plain call of the
loaded model. The tiny Gemma 2 caps at 5,
and its query and key weights are scaled up so that the cap changes its scores: without the cap each test here
fails against transformers' eager reference."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from amulet_core.engine.config import EngineConfig
from amulet_core.engine.llm_engine import LLMEngine
from amulet_core.engine.protocol import GenerationRequest
from amulet_core.method.settings import Method, MethodSettings
from amulet_core.model.loading import LoadedModel, ModelConfig, load_model
from amulet_core.sampling.params import SamplingParams
from tests.engine.device import build_tiny_template_family_model
from tests.engine.test_engine import drain

PROMPT = [5, 80, 900, 3, 17, 42, 7, 1000, 12, 64, 33, 2048, 9]


@pytest.fixture(scope="module")
def gemma2(smollm_tokenizer, tmp_path_factory: pytest.TempPathFactory) -> tuple[LoadedModel, torch.nn.Module]:
    """The tiny Gemma 2 saved and loaded by the server's loader (once refused), and an eager reference copy."""
    built = build_tiny_template_family_model("gemma2", smollm_tokenizer)
    with torch.no_grad():  # scores large enough for the cap to change them (random weights score near 0)
        for layer in built.model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    folder: Path = tmp_path_factory.mktemp("gemma2")
    built.model.save_pretrained(folder)
    built.tokenizer.save_pretrained(folder)
    loaded = load_model(ModelConfig(model=str(folder), device="cpu", dtype="float32", model_cache="none"))
    assert loaded.model.config.attn_logit_softcapping == 5.0
    reference = copy.deepcopy(loaded.model)
    reference.set_attn_implementation("eager")
    return loaded, reference


def reference_logprobs(reference: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(reference(torch.tensor([ids])).logits[0, -1].float(), dim=-1)


@pytest.mark.parametrize(
    ("deterministic", "backend"), [(True, "fixed-order"), (True, "sdpa"), (False, "auto")], ids=["kernel", "invariant", "sdpa"]
)
def test_the_engine_applies_the_soft_cap(gemma2, deterministic, backend):
    loaded, reference = gemma2
    config = EngineConfig(max_model_len=256, kv_cache_tokens=2048, deterministic=deterministic, attention_backend=backend)
    engine = LLMEngine(loaded, config)
    sampling = SamplingParams(max_tokens=3, temperature=0, logprobs=True, top_logprobs=5)
    requests = {
        method: GenerationRequest.from_contexts(
            method.value,
            [tuple(PROMPT), tuple(PROMPT[3:])][: 2 if method is Method.AMULET else 1],
            sampling,
            MethodSettings(method=method),
        )  # fmt: skip
        for method in (Method.BASE, Method.AMULET)
    }
    for request in requests.values():
        engine.add_request(request)
    outs = drain(engine)
    base = [o for o in outs["base"] if o.token_ids]
    ids = list(PROMPT)
    for output in base:  # every generated token's logprob, at its prefix, against the eager reference
        assert output.logprobs is not None
        for entry in output.logprobs:
            wanted = reference_logprobs(reference, ids)
            assert int(wanted.argmax()) == entry.token_id
            assert entry.logprob == pytest.approx(float(wanted[entry.token_id]), abs=1e-4)
            for token_id, _, logprob in entry.top:  # the runners-up too (the first is near-certain)
                assert logprob == pytest.approx(float(wanted[token_id]), abs=1e-3), token_id
            ids.append(entry.token_id)
    assert len(ids) == len(PROMPT) + 3
    assert any(o.token_ids for o in outs["amulet"])


def test_a_plain_call_of_the_loaded_model_applies_the_soft_cap(gemma2):
    loaded, reference = gemma2
    LLMEngine(loaded, EngineConfig(max_model_len=256, kv_cache_tokens=2048))  # switches it to the paged attention
    assert loaded.model.config._attn_implementation != "eager"
    with torch.no_grad():
        got = loaded.model(torch.tensor([PROMPT])).logits
        want = reference(torch.tensor([PROMPT])).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
