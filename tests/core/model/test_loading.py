"""Model loading: the dtype chosen for the device, and clear errors for a model, dtype or device that cannot load.

None of these loads SmolLM2's weights: each fails (or resolves) before that.
"""

from __future__ import annotations

import pytest
import torch

from amulet_core.errors import ModelLoadError
from amulet_core.model.loading import ModelConfig, load_model, resolve_dtype


def test_bf16_is_the_auto_dtype_on_a_bf16_cpu_and_loads(monkeypatch):
    import amulet_core.model.loading as loading

    monkeypatch.setattr(loading, "cpu_has_native_bf16", lambda: True)
    assert resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16
    monkeypatch.setattr(loading, "cpu_has_native_bf16", lambda: False)
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16


@pytest.mark.parametrize(
    ("model", "hint"),
    [
        ("/nonexistent/model.gguf", "does not exist"),
        ("/tmp", "not a Hugging Face model folder"),
        ("no-such-org/no-such-model-xyz", "offline"),
    ],
)
def test_bad_model_gives_a_clear_error(model, hint):
    with pytest.raises(ModelLoadError) as info:
        load_model(ModelConfig(model=model))
    assert hint in str(info.value)


def test_bad_dtype_and_device_give_clear_errors():
    with pytest.raises(ModelLoadError, match="dtype"):
        load_model(ModelConfig(dtype="int3"))
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="CUDA"):
            load_model(ModelConfig(device="cuda"))
