"""A pytest plugin for running the engine tests on a bare (GPU) machine without tests/conftest.py.

``benchmarks/gpu_check.sh`` runs ``pytest --noconftest -p tests.engine.gpu_plugin tests/engine/test_engine.py``
so that the server's packages (which tests/conftest.py imports) need not be installed there; this plugin gives
the tests the one fixture they use, ``tiny_model``, built as tests/conftest.py builds it, and leaves out the engines'
start-up capture of decode graphs (each engine a test builds would capture every bucket and tail variant there: the
device's minutes are few); their decode graphs are captured on first use, and the start-up capture itself is tested
where a test calls it (``test_decode_graphs.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from amulet_core.engine.model_runner import ModelRunner
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


@pytest.fixture(autouse=True)
def no_start_up_capture(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ModelRunner, "_capture_graphs_at_start", lambda self, budget_s: None)
