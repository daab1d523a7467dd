"""A model the engine would serve wrongly is refused at load time with a clear message, never served."""

from __future__ import annotations

from pathlib import Path

import pytest

from amulet_core.errors import ModelLoadError
from amulet_core.model.loading import ModelConfig, load_model
from tests.engine.device import build_tiny_template_family_model


def test_attention_soft_capping_is_refused(tmp_path: Path, smollm_tokenizer) -> None:
    """Gemma 2 caps its attention scores; the paged attention does not, so its answers would be wrong."""
    loaded = build_tiny_template_family_model("gemma2", smollm_tokenizer)
    loaded.model.save_pretrained(tmp_path)
    loaded.tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="attn_logit_softcapping"):
        load_model(ModelConfig(model=str(tmp_path), device="cpu", dtype="float32", model_cache="none"))
