"""A pytest plugin for running the engine tests on a bare (GPU) machine without tests/conftest.py.

``benchmarks/gpu_check.sh`` runs ``pytest --noconftest -p tests.engine.gpu_plugin tests/engine/test_engine.py``
so that the server's packages (which tests/conftest.py imports) need not be installed there; this plugin gives
the tests the one fixture they use, ``tiny_model``, built as tests/conftest.py builds it.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from amulet_core.model.loading import LoadedModel
from tests.engine.device import build_tiny_model, saved_tokenizer


@pytest.fixture(scope="session")
def tiny_model() -> Callable[[str], LoadedModel]:
    tokenizer = saved_tokenizer()
    if tokenizer is None:
        raise RuntimeError("set AMULET_TEST_TOKENIZER to a saved tokenizer folder")
    cache: dict[str, LoadedModel] = {}

    def make(family: str = "llama") -> LoadedModel:
        if family not in cache:
            cache[family] = build_tiny_model(family, tokenizer)
        return cache[family]

    return make
