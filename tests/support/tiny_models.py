"""Tiny random-weight models with SmolLM2's tokenizer: fast stand-ins for the real model's code paths."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from benchmarks.host_overhead import TINY_MODEL_FIELDS


def tiny_config(family: str, vocab_size: int, **overrides: Any) -> Any:
    """A two-layer config of ``family`` (llama, qwen2, mistral) with large random weights (``initializer_range``)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common: dict[str, Any] = {**TINY_MODEL_FIELDS, "vocab_size": vocab_size}
    common.update(overrides)
    if family == "llama":
        return LlamaConfig(**common)
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "mistral":
        return MistralConfig(**common, sliding_window=None)
    raise ValueError(family)


def save_tiny_reward_model(tokenizer: Any, path: Path, chat_template: bool = True) -> Path:
    """A tiny Llama sequence classifier (one score) saved at ``path`` with ``tokenizer`` (without its chat template
    when ``chat_template`` is False)."""
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(0)
    config = tiny_config("llama", len(tokenizer), max_position_embeddings=2048, num_labels=1)
    LlamaForSequenceClassification(config).eval().save_pretrained(path)
    tok = copy.deepcopy(tokenizer)
    if not chat_template:
        tok.chat_template = None
    tok.save_pretrained(path)
    return path
