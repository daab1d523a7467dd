"""Shared fixtures: the embedded model's tokenizer and model, and tiny random-weight models."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from amulet_core.loading import LoadedModel, ModelConfig, embedded_model_file, load_model


@pytest.fixture(scope="session")
def smollm_tokenizer():
    from transformers import AutoTokenizer

    gguf = embedded_model_file()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


@pytest.fixture(scope="session")
def smollm() -> LoadedModel:
    """SmolLM2-135M-Instruct in float32 (exact comparisons need it)."""
    return load_model(ModelConfig(dtype="float32"))


def _tiny_config(family: str, vocab_size: int):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        initializer_range=0.5,
        eos_token_id=2,
        bos_token_id=1,
    )
    if family == "llama":
        return LlamaConfig(**common)
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "mistral":
        return MistralConfig(**common, sliding_window=None)
    raise ValueError(family)


@pytest.fixture(scope="session")
def tiny_model(smollm_tokenizer) -> Callable[[str], LoadedModel]:
    """Factory of tiny random-weight models of a family (llama, qwen2, mistral) with SmolLM2's tokenizer."""
    from transformers import AutoModelForCausalLM

    cache: dict[str, LoadedModel] = {}

    def make(family: str = "llama") -> LoadedModel:
        if family not in cache:
            torch.manual_seed(1234)
            model = AutoModelForCausalLM.from_config(_tiny_config(family, len(smollm_tokenizer)), dtype=torch.float32)
            model.eval()
            cache[family] = LoadedModel(
                model, smollm_tokenizer, f"tiny-{family}", torch.device("cpu"), torch.float32, frozenset({2})
            )
        return cache[family]

    return make


@pytest.fixture(autouse=True, scope="module")
def _restore_torch_threads():
    """An engine serving on the CPU sets torch's (process-wide) thread count; undo it per module."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
