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
