"""A model the engine would serve wrongly is refused at load time with a clear message, never served."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from amulet_core.errors import ModelLoadError
from amulet_core.model.loading import ModelConfig, load_model


@pytest.mark.parametrize("method", ["awq", "gptq", "bitsandbytes", "fp8", "compressed-tensors"])
def test_a_prequantized_checkpoint_is_refused_naming_its_format(tmp_path: Path, tiny_model, method: str) -> None:
    """Its weights need a quantization library and kernels the server does not have: refused before loading."""
    loaded = tiny_model("llama")
    loaded.model.save_pretrained(tmp_path)
    loaded.tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method, "bits": 4}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=f"pre-quantized checkpoint \\(quant_method='{method}'\\)"):
        load_model(ModelConfig(model=str(tmp_path), device="cpu", dtype="float32", model_cache="none"))
    del config["quantization_config"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert load_model(ModelConfig(model=str(tmp_path), device="cpu", dtype="float32", model_cache="none")).model is not None
