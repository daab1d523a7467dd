"""Where the tiny test models run: ``AMULET_TEST_DEVICE`` (cpu, cuda) and ``AMULET_TEST_DTYPE`` (float32,
bfloat16, float16); default the CPU in float32. ``AMULET_TEST_TOKENIZER`` names a saved tokenizer folder
to use instead of the embedded SmolLM2's (a GPU machine has no embedded model: ``benchmarks/gpu_check.sh``).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from amulet_core.model.loading import LoadedModel
from tests.support.tiny_models import tiny_config

DEVICE_ENV = "AMULET_TEST_DEVICE"
DTYPE_ENV = "AMULET_TEST_DTYPE"
TOKENIZER_ENV = "AMULET_TEST_TOKENIZER"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def tiny_device() -> torch.device:
    return torch.device(os.environ.get(DEVICE_ENV) or "cpu")


def tiny_dtype() -> torch.dtype:
    return _DTYPES[os.environ.get(DTYPE_ENV) or "float32"]


def saved_tokenizer() -> Any | None:
    """The tokenizer of ``AMULET_TEST_TOKENIZER``, or None when it is not set."""
    path = os.environ.get(TOKENIZER_ENV)
    if not path:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def build_tiny_model(family: str, tokenizer: Any) -> LoadedModel:
    """A tiny random-weight model of ``family`` (seeded) on the test device, in the test dtype."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(tiny_config(family, len(tokenizer)), dtype=torch.float32)
    device, dtype = tiny_device(), tiny_dtype()
    model = model.to(device=device, dtype=dtype).eval()  # the same weights on every device and dtype
    return LoadedModel(model, tokenizer, f"tiny-{family}", device, dtype, frozenset({2}))


TEMPLATE_FAMILIES = ("gemma2", "gemma3", "phi3", "qwen3")
"""Families beyond tests/support/tiny_models.py's, for the chat-template tests (built from their configs)."""


def tiny_template_family_config(family: str, vocab_size: int) -> Any:
    """A two-layer config of ``family`` (one of TEMPLATE_FAMILIES, or one that ``tiny_config`` knows), in the
    tiny models' shape (head size 16 where the family's default would be another; Gemma 2's attention
    soft cap 5 instead of 50, so that it changes a tiny model's answers)."""
    from transformers import Gemma2Config, Gemma3TextConfig, Phi3Config, Qwen3Config

    from benchmarks.host_overhead import TINY_MODEL_FIELDS

    common: dict[str, Any] = {**TINY_MODEL_FIELDS, "vocab_size": vocab_size}
    if family == "gemma2":
        return Gemma2Config(**common, head_dim=16, attn_logit_softcapping=5.0)
    if family == "gemma3":
        return Gemma3TextConfig(**common, head_dim=16)
    if family == "phi3":
        return Phi3Config(**common)
    if family == "qwen3":
        return Qwen3Config(**common, head_dim=16)
    return tiny_config(family, vocab_size)


def build_tiny_template_family_model(family: str, tokenizer: Any) -> LoadedModel:
    """:func:`build_tiny_model` for any family of :func:`tiny_template_family_config` (seeded, test device and dtype)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1234)
    config = tiny_template_family_config(family, len(tokenizer))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    device, dtype = tiny_device(), tiny_dtype()
    model = model.to(device=device, dtype=dtype).eval()
    return LoadedModel(model, tokenizer, f"tiny-{family}", device, dtype, frozenset({2}))
